// The Pleiades dashboard: reads the REST API, draws the charts, and follows live updates for
// today. No framework and no build step; every number drawn carries its value in data-value so
// that what people see can be checked against the API.
"use strict";

const DAY_SECONDS = 86400;
const TREND_DAYS = 366;
const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat();
const state = { today: null, selected: null, live: null, days: [], feed: null };

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
    name.textContent = row.label || row.name;
    name.title = row.title || row.label || row.name;
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
    num.textContent = fmt.format(row.value);
    li.append(name, track, num);
    li.setAttribute("aria-label", `${row.label || row.name}: ${fmt.format(row.value)}`);
    return li;
  }));
}

function render(counters) {
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
  renderBars($("families"), Object.entries(families).map(([name, value]) => ({ name, value })).sort(byValue), (r) => familyColor(r.name));
  renderBars($("wikis"), wikis.sort(byValue).slice(0, 15), (r) => familyColor(r.family));
  renderBars($("types"), types.sort(byValue));
}

function renderTrend(days) {
  const box = $("trend");
  if (!days.length) { box.textContent = "No days yet."; return; }
  const w = 800, h = 180, pad = 28;
  const values = days.map((d) => d.counters.pleiades_total || 0);
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
    if (d.day === state.selected) dot.setAttribute("class", "sel");
    const title = document.createElementNS(ns, "title");
    title.textContent = `${dayLabel(d.day)}: ${fmt.format(values[i])} events`;
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

async function loadDay(day) {
  state.selected = day;
  const stats = await getJSON(`/api/stats/${day}`);
  showMessage(stats ? "" : `No events counted for ${dayLabel(day)} yet.`);
  render(toMap(stats));
  document.body.dataset.loadedDay = day;
}

async function loadDays() {
  const days = (await getJSON("/api/days")) || [];
  state.days = days;
  const select = $("day");
  const options = new Set([...days, state.today]);
  const sorted = [...options].sort((a, b) => Number(b) - Number(a));
  select.replaceChildren(...sorted.map((d) => {
    const o = document.createElement("option");
    o.value = d;
    o.textContent = d === state.today ? `${dayLabel(d)} (today, live)` : dayLabel(d);
    return o;
  }));
  select.value = state.selected || state.today;
  if (days.length) {
    // The trend shows at most the last year on record: the page costs the same on the first
    // day and after ten years.
    const last = Number(days[days.length - 1]);
    const from = Math.max(Number(days[0]), last - TREND_DAYS + 1);
    const range = await getJSON(`/api/range?from=${from}&to=${last}`);
    renderTrend(range || []);
  } else {
    renderTrend([]);
  }
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
