// The Pleiades dashboard: reads the REST API, draws the charts, and follows live updates for
// today. No framework and no build step; every number drawn carries its value in data-value so
// that what people see can be checked against the API.
"use strict";

const DAY_SECONDS = 86400;
const TREND_DAYS = 366;
const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat();
const state = {
  today: null, selected: null, live: null, days: [], feed: null,
  // Without Wikidata: every panel leaves it out (see withoutWikidata and the API's exclude).
  noWikidata: false, counters: {}, hours: null, range: [], panels: 0, panelsLoaded: 0,
  // The coverage verdict of each day of the trend (GET /api/coverage), by day.
  coverage: {},
};
const WIKIDATA = "pleiades_wikidata_";

const FAMILIES = [
  ["Wikidata", /^wikidatawiki$/], ["Commons", /^commonswiki$/], ["Wiktionary", /wiktionary$/],
  ["Wikisource", /wikisource$/], ["Wikibooks", /wikibooks$/], ["Wikinews", /wikinews$/],
  ["Wikiquote", /wikiquote$/], ["Wikiversity", /wikiversity$/], ["Wikivoyage", /wikivoyage$/],
  ["Meta and others", /^(metawiki|specieswiki|mediawikiwiki|incubatorwiki|outreachwiki|foundationwiki|wikimaniawiki|loginwiki|testwiki|test2wiki|testwikidatawiki|testcommonswiki)$/],
  ["Wikipedia", /wiki$/],
];

function family(wiki) {
  for (const [name, pattern] of FAMILIES) if (pattern.test(wiki)) return name;
  return "Other";
}

function familyColor(name) {
  const known = { Wikipedia: "wikipedia", Wiktionary: "wiktionary", Wikidata: "wikidata", Commons: "commons", Wikisource: "wikisource" };
  return `var(--f-${known[name] || "other"})`;
}

function dayLabel(day) {
  return new Date(Number(day) * DAY_SECONDS * 1000).toISOString().slice(0, 10);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function toMap(stats) {
  const map = {};
  if (!stats) return map;
  if (Array.isArray(stats.counters)) for (const c of stats.counters) map[c.name] = c.value;
  else Object.assign(map, stats.counters || {});
  return map;
}

function setStat(id, value, text) {
  const el = $(id);
  el.dataset.value = String(value);
  el.textContent = text;
}

function renderBars(list, rows, colorOf) {
  const max = Math.max(1, ...rows.map((r) => r.value));
  list.replaceChildren(...rows.map((row) => {
    const li = document.createElement("li");
    li.dataset.name = row.name;
    li.dataset.value = String(row.value);
    const name = document.createElement("span");
    name.className = "name";
    name.title = row.title || row.label || row.name;
    if (row.href) {
      const link = document.createElement("a");
      link.href = row.href;
      link.rel = "noopener noreferrer";
      link.textContent = row.label || row.name;
      name.append(link);
    } else {
      name.textContent = row.label || row.name;
    }
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * row.value) / max}%`;
    if (colorOf) fill.style.background = colorOf(row);
    track.append(fill);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = `${row.bound ? "≤ " : ""}${fmt.format(row.value)}`;
    if (row.bound) num.title = "an upper bound: the sketch could not tell this count exactly";
    li.append(name, track, num);
    li.setAttribute("aria-label", `${row.label || row.name}: ${fmt.format(row.value)}`);
    return li;
  }));
}

// The counters of a day without Wikidata: each counter less its Wikidata share
// (pleiades_wikidata_<x> of pleiades_<x>); the total less pleiades_family_wikidata; the
// Wikidata wiki and family left out. Counters without a share (languages) have none there.
function withoutWikidata(counters) {
  const out = {};
  for (const [name, value] of Object.entries(counters)) {
    if (name.startsWith(WIKIDATA) || name === "pleiades_family_wikidata") continue;
    if (name.startsWith("pleiades_wiki_")) {
      if (family(name.slice("pleiades_wiki_".length)) !== "Wikidata") out[name] = value;
      continue;
    }
    const share = name === "pleiades_total"
      ? counters.pleiades_family_wikidata
      : counters[WIKIDATA + name.slice("pleiades_".length)];
    out[name] = value - (share || 0);
  }
  return out;
}

function shown(counters) {
  return state.noWikidata ? withoutWikidata(counters) : counters;
}

const FAMILY_LABELS = {
  wikipedia: "Wikipedia", wiktionary: "Wiktionary", wikibooks: "Wikibooks", wikinews: "Wikinews",
  wikiquote: "Wikiquote", wikisource: "Wikisource", wikiversity: "Wikiversity", wikivoyage: "Wikivoyage",
  wikidata: "Wikidata", commons: "Commons", wikifunctions: "Wikifunctions", mediawiki: "MediaWiki",
  meta: "Meta-Wiki", species: "Wikispecies", incubator: "Incubator", wikimedia: "Wikimedia",
  test: "Test wikis", other: "Other",
};

const NAMESPACES = {
  "-2": "Media", "-1": "Special", 0: "Articles (main)", 1: "Talk", 2: "User", 3: "User talk",
  4: "Project", 5: "Project talk", 6: "File", 7: "File talk", 8: "MediaWiki", 9: "MediaWiki talk",
  10: "Template", 11: "Template talk", 12: "Help", 13: "Help talk", 14: "Category",
  15: "Category talk", 100: "Portal", 118: "Draft", 120: "Property (Wikidata)",
  146: "Lexeme (Wikidata)", 828: "Module", 829: "Module talk", 2600: "Topic",
};

const USER_CLASSES = {
  registered: "Registered", temporary: "Temporary", anonymous: "Anonymous (IP)", bot: "Bots",
};

function prefixed(counters, prefix, label) {
  const rows = [];
  for (const [name, value] of Object.entries(counters)) {
    if (name.startsWith(prefix) && value > 0) {
      const key = name.slice(prefix.length);
      rows.push({ name, label: label(key), title: `${label(key)} (${name})`, value });
    }
  }
  return rows;
}

function render(raw) {
  state.counters = raw;
  const counters = shown(raw);
  const total = counters.pleiades_total || 0;
  const pct = (n) => (total ? `${((100 * n) / total).toFixed(1)} %` : "–");
  setStat("stat-total", total, fmt.format(total));
  setStat("stat-bot", counters.pleiades_bot || 0, pct(counters.pleiades_bot || 0));
  setStat("stat-minor", counters.pleiades_minor || 0, pct(counters.pleiades_minor || 0));
  const growth = counters.pleiades_growth || 0;
  setStat("stat-growth", growth, `${growth > 0 ? "+" : ""}${fmt.format(growth)}`);

  const wikis = [];
  const families = {};
  const types = [];
  for (const [name, value] of Object.entries(counters)) {
    if (name.startsWith("pleiades_wiki_")) {
      const wiki = name.slice("pleiades_wiki_".length);
      const fam = family(wiki);
      wikis.push({ name, label: wiki, value, family: fam, title: `${wiki} (${fam})` });
      families[fam] = (families[fam] || 0) + value;
    } else if (name.startsWith("pleiades_type_")) {
      types.push({ name, label: name.slice("pleiades_type_".length), value });
    }
  }
  const byValue = (a, b) => b.value - a.value || a.name.localeCompare(b.name);
  // The stored family counters where the day has them; days counted before them get the
  // families the page derives from the wikis' names.
  const counted = prefixed(counters, "pleiades_family_", (f) => FAMILY_LABELS[f] || f);
  const familyRows = counted.length
    ? counted
    : Object.entries(families).map(([name, value]) => ({ name, value }));
  renderBars($("families"), familyRows.sort(byValue), (r) => familyColor(r.label || r.name));
  renderBars($("wikis"), wikis.sort(byValue).slice(0, 15), (r) => familyColor(r.family));
  renderBars($("types"), types.sort(byValue));
  const languages = prefixed(counters, "pleiades_language_", (key) => {
    const cut = key.indexOf("_");
    return `${key.slice(cut + 1)} · ${FAMILY_LABELS[key.slice(0, cut)] || key.slice(0, cut)}`;
  });
  renderBars($("languages"), languages.sort(byValue).slice(0, 15));
  renderBars($("namespaces"), prefixed(counters, "pleiades_namespace_", (n) => NAMESPACES[n] || `Namespace ${n}`).sort(byValue).slice(0, 12));
  renderBars($("users"), prefixed(counters, "pleiades_user_", (c) => USER_CLASSES[c] || c).sort(byValue));
  const added = counters.pleiades_bytes_added || 0;
  const removed = counters.pleiades_bytes_removed || 0;
  setStat("stat-added", added, `+${fmt.format(added)}`);
  setStat("stat-removed", removed, `−${fmt.format(removed)}`);
}

// The day by hour: humans and bots stacked, drawn at the box's own width so that its text
// stays readable on a phone. Each hour carries its numbers in data attributes.
function hourValues(hours) {
  const sub = (c, who) => (c[`pleiades_${who}`] || 0) - (state.noWikidata ? (c[`${WIKIDATA}${who}`] || 0) : 0);
  return hours.map((h) => ({ hour: h.hour, human: sub(h.counters, "human"), bot: sub(h.counters, "bot") }));
}

function readout(v) {
  const hh = String(v.hour).padStart(2, "0");
  return `${hh}:00–${hh}:59 UTC: ${fmt.format(v.human + v.bot)} events, ${fmt.format(v.human)} by humans, ${fmt.format(v.bot)} by bots`;
}

function renderHours() {
  const box = $("hours");
  const hours = state.hours;
  if (!hours) { box.textContent = "No events by hour for this day."; box.dataset.values = "[]"; return; }
  const values = hourValues(hours);
  box.dataset.values = JSON.stringify(values);
  const ns = "http://www.w3.org/2000/svg";
  const w = Math.max(280, box.clientWidth || 800), h = box.clientWidth < 480 ? 170 : 200;
  const left = 44, right = 6, top = 8, bottom = 22;
  const max = Math.max(1, ...values.map((v) => v.human + v.bot));
  const slot = (w - left - right) / 24;
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Events by hour on ${dayLabel(state.selected)}, humans and bots`);
  const el = (name, attrs) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(max * frac);
    svg.append(el("line", { class: "grid-line", x1: left, x2: w - right, y1: y(v), y2: y(v) }));
    const label = el("text", { class: "axis", x: left - 4, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = fmt.format(v);
    svg.append(label);
  }
  for (const v of values) {
    const x = left + v.hour * slot;
    const g = el("g", { class: "hour" });
    g.dataset.hour = String(v.hour);
    g.dataset.human = String(v.human);
    g.dataset.bot = String(v.bot);
    const bar = Math.max(1, slot - 2);
    g.append(el("rect", { class: "hit", x, y: top, width: slot, height: h - top - bottom }));
    g.append(el("rect", { class: "human", x: x + 1, y: y(v.human), width: bar, height: Math.max(0, y(0) - y(v.human)) }));
    g.append(el("rect", { class: "bot", x: x + 1, y: y(v.human + v.bot), width: bar, height: Math.max(0, y(v.human) - y(v.human + v.bot)) }));
    const title = el("title", {});
    title.textContent = readout(v);
    g.append(title);
    const show = () => {
      for (const other of svg.querySelectorAll("g.hour.sel")) other.classList.remove("sel");
      g.classList.add("sel");
      $("hours-readout").textContent = readout(v);
    };
    g.addEventListener("pointerenter", show);
    g.addEventListener("click", show);
    svg.append(g);
    if (v.hour % (slot < 22 ? 6 : 3) === 0) {
      const label = el("text", { class: "axis", x: x + slot / 2, y: h - 6, "text-anchor": "middle" });
      label.textContent = String(v.hour).padStart(2, "0");
      svg.append(label);
    }
  }
  box.replaceChildren(svg);
}

function topRows(top) {
  return (top ? top.entries : []).map((e) => ({
    name: e.key,
    label: e.title !== undefined ? e.title : e.key,
    title: e.title !== undefined ? `${e.title} (${e.wiki})` : `${e.key}${e.server ? ` (${e.server})` : ""}`,
    href: e.url,
    value: e.count,
    bound: !e.exact,
  }));
}

// The panels built from a day's sketches and per-hour counters; the API leaves Wikidata out
// of the sketches (exclude=wikidata), since an editor or a page cannot be subtracted.
async function loadPanels(day) {
  const ask = ++state.panels;
  const exclude = state.noWikidata ? "&exclude=wikidata" : "";
  const [hours, editors, pages, people] = await Promise.all([
    getJSON(`/api/hours/${day}`),
    getJSON(`/api/editors/${day}?${exclude.slice(1)}`),
    getJSON(`/api/top/${day}?what=pages&limit=15${exclude}`),
    getJSON(`/api/top/${day}?what=editors&limit=15${exclude}`),
  ]);
  if (ask !== state.panels) return; // a later request (another day, the toggle) wins
  state.hours = hours ? hours.hours : null;
  renderHours();
  const count = editors ? editors.editors : 0;
  setStat("stat-editors", count, fmt.format(count));
  $("stat-editors").title = editors ? `estimated within ±${(100 * editors.standard_error).toFixed(2)} % (one standard error)` : "";
  renderBars($("top-pages"), topRows(pages));
  renderBars($("top-editors"), topRows(people));
  state.panelsLoaded = Date.now();
  document.body.dataset.panels = `${day}:${state.noWikidata ? "without" : "with"}-wikidata`;
}

function renderTrend(days) {
  const box = $("trend");
  if (!days.length) { box.textContent = "No days yet."; return; }
  const w = 800, h = 180, pad = 28;
  const values = days.map((d) => (d.counters.pleiades_total || 0) - (state.noWikidata ? (d.counters.pleiades_family_wikidata || 0) : 0));
  const max = Math.max(1, ...values);
  const x = (i) => pad + (days.length === 1 ? (w - 2 * pad) / 2 : (i * (w - 2 * pad)) / (days.length - 1));
  const y = (v) => h - pad - (v * (h - 2 * pad)) / max;
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Events per day from ${dayLabel(days[0].day)} to ${dayLabel(days[days.length - 1].day)}`);
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `${x(0)},${h - pad} ${points} ${x(days.length - 1)},${h - pad}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", "line");
  line.setAttribute("points", points);
  svg.append(area, line);
  days.forEach((d, i) => {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", x(i)); dot.setAttribute("cy", y(values[i])); dot.setAttribute("r", 3.5);
    dot.dataset.day = d.day; dot.dataset.value = String(values[i]);
    const verdict = state.coverage[d.day];
    const partial = verdict && verdict.status === "partial";
    const classes = [d.day === state.selected ? "sel" : "", partial ? "partial" : ""].filter(Boolean);
    if (classes.length) dot.setAttribute("class", classes.join(" "));
    if (verdict) dot.dataset.coverage = verdict.status;
    const title = document.createElementNS(ns, "title");
    title.textContent = `${dayLabel(d.day)}: ${fmt.format(values[i])} events${state.noWikidata ? " without Wikidata" : ""}${partial ? ` (incomplete: ${fmt.format(verdict.missed)} upstream events missed)` : ""}`;
    dot.append(title);
    svg.append(dot);
  });
  const labels = days.length === 1 ? [[0, "middle"]] : [[0, "start"], [days.length - 1, "end"]];
  for (const [i, anchor] of labels) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("class", "axis"); label.setAttribute("x", x(i)); label.setAttribute("y", h - 8);
    label.setAttribute("text-anchor", anchor);
    label.textContent = dayLabel(days[i].day);
    svg.append(label);
  }
  box.replaceChildren(svg);
}

function showMessage(text) {
  const el = $("message");
  el.hidden = !text;
  el.textContent = text || "";
}

// Says, above the day's numbers, when upstream events of the day never arrived.
function showCoverage(verdict, day) {
  const el = $("coverage");
  const partial = verdict && verdict.status === "partial";
  el.hidden = !partial;
  el.dataset.missed = partial ? String(verdict.missed) : "0";
  if (!partial) { el.textContent = ""; return; }
  // A time of another day (a gap over midnight) carries its date.
  const at = (t) => (t.slice(0, 10) === dayLabel(day) ? t.slice(11, 19) : `${t.slice(0, 10)} ${t.slice(11, 19)}`);
  const spans = verdict.gaps.slice(0, 3).map((g) => `${at(g.from)}–${at(g.to)}`);
  const more = verdict.gaps.length + (verdict.gaps_not_listed || 0) - spans.length;
  el.textContent = `Incomplete day: ${fmt.format(verdict.missed)} upstream events never arrived (UTC ${spans.join(", ")}${more > 0 ? ` and ${fmt.format(more)} more gaps` : ""}).`;
}

async function loadDay(day) {
  state.selected = day;
  const stats = await getJSON(`/api/stats/${day}`);
  showMessage(stats ? "" : `No events counted for ${dayLabel(day)} yet.`);
  showCoverage(stats && stats.coverage, day);
  render(toMap(stats));
  await loadPanels(day);
  document.body.dataset.loadedDay = day;
}

async function loadDays() {
  const days = (await getJSON("/api/days")) || [];
  state.days = days;
  if (days.length) {
    // The trend shows at most the last year on record: the page costs the same on the first
    // day and after ten years.
    const last = Number(days[days.length - 1]);
    const from = Math.max(Number(days[0]), last - TREND_DAYS + 1);
    const [range, coverage] = await Promise.all([
      getJSON(`/api/range?from=${from}&to=${last}`),
      getJSON(`/api/coverage?from=${from}&to=${last}`),
    ]);
    state.range = range || [];
    state.coverage = {};
    for (const d of (coverage && coverage.days) || []) state.coverage[d.day] = d;
  } else {
    state.range = [];
    state.coverage = {};
  }
  const select = $("day");
  const options = new Set([...days, state.today]);
  const sorted = [...options].sort((a, b) => Number(b) - Number(a));
  select.replaceChildren(...sorted.map((d) => {
    const o = document.createElement("option");
    o.value = d;
    const verdict = state.coverage[d];
    const partial = verdict && verdict.status === "partial";
    o.textContent = (d === state.today ? `${dayLabel(d)} (today, live)` : dayLabel(d)) + (partial ? " · incomplete" : "");
    if (verdict) o.dataset.coverage = verdict.status;
    return o;
  }));
  select.value = state.selected || state.today;
  renderTrend(state.range);
}

async function loadTotals() {
  const totals = toMap(await getJSON("/api/totals"));
  setStat("alltime-total", totals.pleiades_total || 0, fmt.format(totals.pleiades_total || 0));
}

function follow() {
  const status = $("live-status");
  const source = new EventSource("/api/live");
  source.addEventListener("counters", (event) => {
    const update = JSON.parse(event.data);
    status.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    status.classList.add("on");
    setStat("alltime-total", update.all_time.pleiades_total || 0, fmt.format(update.all_time.pleiades_total || 0));
    if (update.day !== state.today) { state.today = update.day; loadDays(); }
    if (state.selected === update.day && Object.keys(update.counters).length) {
      showMessage("");
      render(update.counters);
      if (Date.now() - state.panelsLoaded > 15000) loadPanels(state.selected).catch(() => {});
      document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
    }
    if (!state.days.includes(update.day) && Object.keys(update.counters).length) loadDays();
  });
  source.onerror = () => { status.textContent = "reconnecting…"; status.classList.remove("on"); };
}

// The live feed: recent changes from the relay (/v2/stream/recentchange), filtered on the
// server by wiki. The browser's EventSource resumes by itself with Last-Event-ID.
const FEED_ROWS = 25;

function sizeChange(change) {
  const length = change.length;
  if (!length || typeof length !== "object") return null;
  return (Number(length.new) || 0) - (Number(length.old) || 0);
}

function addChange(change) {
  const list = $("feed");
  const li = document.createElement("li");
  li.dataset.wiki = String(change.wiki || "");
  li.dataset.id = String((change.meta && change.meta.id) || "");
  const title = document.createElement(change.meta && /^https?:\/\//.test(change.meta.uri || "") ? "a" : "span");
  title.className = "title";
  title.textContent = change.title || (change.log_type ? `log: ${change.log_type}` : "(untitled)");
  if (title.tagName === "A") { title.href = change.meta.uri; title.rel = "noopener noreferrer"; }
  const wiki = document.createElement("span");
  wiki.className = "wiki";
  wiki.textContent = change.wiki || "";
  const user = document.createElement("span");
  user.className = "user";
  user.textContent = change.user || "";
  if (change.bot === true) user.textContent += " (bot)";
  const delta = document.createElement("span");
  const bytes = sizeChange(change);
  delta.className = `delta ${bytes > 0 ? "up" : bytes < 0 ? "down" : ""}`;
  delta.textContent = bytes === null ? "" : `${bytes > 0 ? "+" : ""}${fmt.format(bytes)}`;
  li.dataset.delta = bytes === null ? "" : String(bytes);
  li.append(title, wiki, user, delta);
  list.prepend(li);
  while (list.children.length > FEED_ROWS) list.lastElementChild.remove();
  document.body.dataset.feedEvents = String(Number(document.body.dataset.feedEvents || 0) + 1);
}

function followFeed(wikis) {
  if (state.feed) state.feed.close();
  $("feed").replaceChildren();
  document.body.dataset.feedEvents = "0";
  document.body.dataset.feedFilter = wikis;
  const status = $("feed-status");
  status.textContent = "connecting…";
  const query = wikis ? `?wiki=${encodeURIComponent(wikis)}` : "";
  const source = new EventSource(`/v2/stream/recentchange${query}`);
  state.feed = source;
  source.onopen = () => { status.textContent = wikis ? `live · ${wikis}` : "live · all wikis"; status.classList.add("on"); };
  source.onmessage = (event) => {
    try { addChange(JSON.parse(event.data)); } catch (err) { /* not an event: skip it */ }
  };
  source.onerror = () => { status.textContent = "reconnecting…"; status.classList.remove("on"); };
}

async function main() {
  state.today = String(Math.floor(Date.now() / 1000 / DAY_SECONDS));
  const requested = new URLSearchParams(location.search).get("day");
  state.selected = requested || state.today;
  $("day").addEventListener("change", (e) => loadDay(e.target.value).then(loadDays).catch((err) => showMessage(String(err))));
  state.noWikidata = $("no-wikidata").checked;
  $("no-wikidata").addEventListener("change", (e) => {
    state.noWikidata = e.target.checked;
    render(state.counters);
    renderHours();
    renderTrend(state.range);
    loadPanels(state.selected).catch((err) => showMessage(String(err)));
  });
  let resized = null;
  window.addEventListener("resize", () => { clearTimeout(resized); resized = setTimeout(renderHours, 150); });
  try {
    await loadDays();
    if (!requested && !state.days.includes(state.today) && state.days.length) state.selected = state.days[state.days.length - 1];
    $("day").value = state.selected;
    await Promise.all([loadDay(state.selected), loadTotals()]);
    await loadDays();
  } catch (err) {
    showMessage(`The API could not be read: ${err.message}`);
  }
  follow();
  $("feed-form").addEventListener("submit", (e) => {
    e.preventDefault();
    followFeed($("feed-wiki").value.split(",").map((w) => w.trim()).filter(Boolean).join(","));
  });
  followFeed("");
}

main();
