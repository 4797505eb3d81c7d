//! Which Wikimedia project a wiki belongs to: its family (Wikipedia, Wiktionary, Wikidata,
//! Commons, …) and, for the families with a wiki per language, its language; from the event's
//! `wiki` (the database name) and `server_name`.
//!
//! The database name is the wiki's identity, so it decides the family: `auth.wikimedia.org`
//! serves the central login of every wiki, and an event there with `wiki: enwiki` belongs to
//! the English Wikipedia. The server name gives the language as people know it
//! (`zh-min-nan.wikipedia.org` for `zh_min_nanwiki`), and the family when there is no `wiki`.
//! Pure: no I/O.

/// A project family. Every event has one: [`Family::Other`] when neither field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Wikipedia,
    Wiktionary,
    Wikibooks,
    Wikinews,
    Wikiquote,
    Wikisource,
    Wikiversity,
    Wikivoyage,
    Wikidata,
    Commons,
    Wikifunctions,
    Mediawiki,
    Meta,
    Species,
    Incubator,
    /// Other wikis of the Wikimedia movement: chapters, the Foundation, outreach, login, …
    Wikimedia,
    /// Test wikis (`testwiki`, `test2wiki`, `testwikidatawiki`, `testcommonswiki`).
    Test,
    Other,
}

impl Family {
    pub const ALL: [Family; 18] = [
        Family::Wikipedia,
        Family::Wiktionary,
        Family::Wikibooks,
        Family::Wikinews,
        Family::Wikiquote,
        Family::Wikisource,
        Family::Wikiversity,
        Family::Wikivoyage,
        Family::Wikidata,
        Family::Commons,
        Family::Wikifunctions,
        Family::Mediawiki,
        Family::Meta,
        Family::Species,
        Family::Incubator,
        Family::Wikimedia,
        Family::Test,
        Family::Other,
    ];

    /// Its place in [`Family::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in counter names and the API: lowercase, no separator.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Wikipedia => "wikipedia",
            Family::Wiktionary => "wiktionary",
            Family::Wikibooks => "wikibooks",
            Family::Wikinews => "wikinews",
            Family::Wikiquote => "wikiquote",
            Family::Wikisource => "wikisource",
            Family::Wikiversity => "wikiversity",
            Family::Wikivoyage => "wikivoyage",
            Family::Wikidata => "wikidata",
            Family::Commons => "commons",
            Family::Wikifunctions => "wikifunctions",
            Family::Mediawiki => "mediawiki",
            Family::Meta => "meta",
            Family::Species => "species",
            Family::Incubator => "incubator",
            Family::Wikimedia => "wikimedia",
            Family::Test => "test",
            Family::Other => "other",
        }
    }

    /// The family named `name` (as [`Family::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The second-level domain of the families with one wiki per language.
    fn language_domain(self) -> Option<&'static str> {
        Some(match self {
            Family::Wikipedia => "wikipedia.org",
            Family::Wiktionary => "wiktionary.org",
            Family::Wikibooks => "wikibooks.org",
            Family::Wikinews => "wikinews.org",
            Family::Wikiquote => "wikiquote.org",
            Family::Wikisource => "wikisource.org",
            Family::Wikiversity => "wikiversity.org",
            Family::Wikivoyage => "wikivoyage.org",
            _ => return None,
        })
    }
}

/// A wiki's project: its family and, for the language families, its language code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Project<'a> {
    pub family: Family,
    pub language: Option<&'a str>,
}

/// Wikis whose database name says their family outright.
const NAMED: &[(&str, Family)] = &[
    ("wikidatawiki", Family::Wikidata),
    ("commonswiki", Family::Commons),
    ("wikifunctionswiki", Family::Wikifunctions),
    ("mediawikiwiki", Family::Mediawiki),
    ("metawiki", Family::Meta),
    ("specieswiki", Family::Species),
    ("incubatorwiki", Family::Incubator),
    ("sourceswiki", Family::Wikisource),
    ("testwiki", Family::Test),
    ("test2wiki", Family::Test),
    ("testwikidatawiki", Family::Test),
    ("testcommonswiki", Family::Test),
    ("labswiki", Family::Wikimedia),
    ("labtestwiki", Family::Wikimedia),
];

/// Database-name suffixes of the language families (and of the chapters' wikis).
const SUFFIXES: &[(&str, Family)] = &[
    ("wiktionary", Family::Wiktionary),
    ("wikibooks", Family::Wikibooks),
    ("wikinews", Family::Wikinews),
    ("wikiquote", Family::Wikiquote),
    ("wikisource", Family::Wikisource),
    ("wikiversity", Family::Wikiversity),
    ("wikivoyage", Family::Wikivoyage),
    ("wikimedia", Family::Wikimedia),
];

impl<'a> Project<'a> {
    /// The project of a wiki named `wiki` (database name) served as `server` (host name); either
    /// may be missing.
    pub fn of(wiki: Option<&'a str>, server: Option<&'a str>) -> Project<'a> {
        let wiki = wiki.filter(|w| !w.is_empty());
        let server = server.filter(|s| !s.is_empty());
        let (family, prefix) = match wiki {
            Some(wiki) => by_database(wiki, server),
            None => (server.map_or(Family::Other, by_server), None),
        };
        let language = family.language_domain().and_then(|domain| {
            let from_server = server
                .and_then(|s| s.strip_suffix(domain))
                .and_then(|s| s.strip_suffix('.'))
                .filter(|label| !label.contains('.') && *label != "www");
            from_server.or(prefix).filter(|code| is_language_code(code))
        });
        Project { family, language }
    }
}

/// The family from the database name, and the name's language prefix when it has one.
fn by_database<'a>(wiki: &'a str, server: Option<&str>) -> (Family, Option<&'a str>) {
    if let Some((_, family)) = NAMED.iter().find(|(name, _)| *name == wiki) {
        return (*family, None);
    }
    for (suffix, family) in SUFFIXES {
        if let Some(prefix) = wiki.strip_suffix(suffix).filter(|p| !p.is_empty()) {
            return (*family, Some(prefix));
        }
    }
    let Some(prefix) = wiki.strip_suffix("wiki").filter(|p| !p.is_empty()) else {
        return (server.map_or(Family::Other, by_server), None);
    };
    // `<name>wiki` on `<name>.wikimedia.org` is one of the movement's own wikis (foundation,
    // outreach, login, …); everywhere else it is a Wikipedia.
    let own = server
        .and_then(|s| s.strip_suffix(".wikimedia.org"))
        .is_some_and(|label| label == prefix);
    if own {
        (Family::Wikimedia, None)
    } else {
        (Family::Wikipedia, Some(prefix))
    }
}

/// The family from the host name alone.
fn by_server(server: &str) -> Family {
    let exact = [
        ("commons.wikimedia.org", Family::Commons),
        ("meta.wikimedia.org", Family::Meta),
        ("species.wikimedia.org", Family::Species),
        ("incubator.wikimedia.org", Family::Incubator),
        ("test.wikidata.org", Family::Test),
        ("test.wikipedia.org", Family::Test),
        ("test2.wikipedia.org", Family::Test),
        ("test-commons.wikimedia.org", Family::Test),
        ("www.mediawiki.org", Family::Mediawiki),
        ("www.wikifunctions.org", Family::Wikifunctions),
    ];
    if let Some((_, family)) = exact.iter().find(|(host, _)| *host == server) {
        return *family;
    }
    if server == "wikidata.org" || server.ends_with(".wikidata.org") {
        return Family::Wikidata;
    }
    for family in Family::ALL {
        if let Some(domain) = family.language_domain() {
            if server == domain || server.ends_with(&format!(".{domain}")) {
                return family;
            }
        }
    }
    if server.ends_with(".wikimedia.org") {
        return Family::Wikimedia;
    }
    Family::Other
}

/// A language code as Wikimedia's hosts spell them: lowercase letters, digits and hyphens
/// (database names use `_` where hosts use `-`, so those are accepted and read as hyphens by
/// [`language_label`]).
fn is_language_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 24
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The language as a counter name carries it: `zh_min_nan` (a database name's form) becomes
/// `zh-min-nan` (the host's form), so both spellings count as one language.
pub fn language_label(code: &str) -> std::borrow::Cow<'_, str> {
    if code.contains('_') {
        std::borrow::Cow::Owned(code.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(code)
    }
}

/// True when `server` looks like a host name (letters, digits, dots, hyphens), so that a link
/// built on it can only point to a web site.
pub fn is_host_name(server: &str) -> bool {
    !server.is_empty()
        && server.len() <= 253
        && server
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !server.starts_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(wiki: &str, server: &str) -> (Family, Option<String>) {
        let wiki = (!wiki.is_empty()).then_some(wiki);
        let server = (!server.is_empty()).then_some(server);
        let project = Project::of(wiki, server);
        (
            project.family,
            project.language.map(|l| language_label(l).into_owned()),
        )
    }

    fn lang(family: Family, language: &str) -> (Family, Option<String>) {
        (family, Some(language.to_owned()))
    }

    #[test]
    fn language_families_carry_their_language() {
        assert_eq!(
            of("enwiki", "en.wikipedia.org"),
            lang(Family::Wikipedia, "en")
        );
        assert_eq!(
            of("frwiktionary", "fr.wiktionary.org"),
            lang(Family::Wiktionary, "fr")
        );
        assert_eq!(
            of("eswikisource", "es.wikisource.org"),
            lang(Family::Wikisource, "es")
        );
        assert_eq!(
            of("zh_min_nanwiki", "zh-min-nan.wikipedia.org"),
            lang(Family::Wikipedia, "zh-min-nan")
        );
        // The host's language wins over the database name's (be_x_oldwiki is be-tarask).
        assert_eq!(
            of("be_x_oldwiki", "be-tarask.wikipedia.org"),
            lang(Family::Wikipedia, "be-tarask")
        );
        assert_eq!(
            of("zh_min_nanwiki", ""),
            lang(Family::Wikipedia, "zh-min-nan")
        );
        assert_eq!(of("", "de.wikivoyage.org"), lang(Family::Wikivoyage, "de"));
    }

    #[test]
    fn the_other_projects_have_no_language() {
        for (wiki, server, family) in [
            ("wikidatawiki", "www.wikidata.org", Family::Wikidata),
            ("commonswiki", "commons.wikimedia.org", Family::Commons),
            ("mediawikiwiki", "www.mediawiki.org", Family::Mediawiki),
            ("metawiki", "meta.wikimedia.org", Family::Meta),
            (
                "incubatorwiki",
                "incubator.wikimedia.org",
                Family::Incubator,
            ),
            ("specieswiki", "species.wikimedia.org", Family::Species),
            (
                "wikifunctionswiki",
                "www.wikifunctions.org",
                Family::Wikifunctions,
            ),
            ("sourceswiki", "wikisource.org", Family::Wikisource),
            ("testwikidatawiki", "test.wikidata.org", Family::Test),
            (
                "foundationwiki",
                "foundation.wikimedia.org",
                Family::Wikimedia,
            ),
            ("nlwikimedia", "nl.wikimedia.org", Family::Wikimedia),
            ("", "www.wikidata.org", Family::Wikidata),
            ("", "commons.wikimedia.org", Family::Commons),
            ("", "", Family::Other),
            ("", "example.org", Family::Other),
            ("somethingelse", "", Family::Other),
        ] {
            assert_eq!(of(wiki, server), (family, None), "{wiki} {server}");
        }
    }

    #[test]
    fn the_database_name_decides_the_family() {
        // Central login serves every wiki from auth.wikimedia.org (in the recorded events).
        assert_eq!(
            of("enwiki", "auth.wikimedia.org"),
            lang(Family::Wikipedia, "en")
        );
    }

    #[test]
    fn every_recorded_event_has_the_family_of_its_host() {
        for file in crate::event::recorded::FILES {
            for line in crate::event::recorded::lines(file) {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                let wiki = v["wiki"].as_str().expect("wiki");
                let server = v["server_name"].as_str().expect("server_name");
                let project = Project::of(Some(wiki), Some(server));
                assert_ne!(project.family, Family::Other, "{wiki} {server}");
                if server != "auth.wikimedia.org" {
                    assert_eq!(project.family, by_server(server), "{wiki} {server}");
                }
                if let Some(language) = project.language {
                    let named = server.starts_with(&format!("{language}."));
                    assert!(named || wiki.starts_with(language), "{wiki} {server}");
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_hosts_are_checked() {
        for (index, family) in Family::ALL.into_iter().enumerate() {
            assert_eq!(Family::parse(family.as_str()), Some(family));
            assert_eq!(family.index(), index);
        }
        assert_eq!(Family::parse("Wikipedia"), None);
        assert!(is_host_name("en.wikipedia.org"));
        for bad in [
            "",
            "javascript:alert(1)",
            "a b",
            "x/y",
            ".hidden",
            "tab\there",
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        // A hostile host does not become a language.
        assert_eq!(of("", "EVIL CODE.wikipedia.org").1, None);
    }
}
