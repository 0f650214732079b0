// The page's behaviour: plain JavaScript, no libraries, no network beyond this server.
// Every text that comes from a user, a model or the dataset goes in with textContent
// (never innerHTML), so a caption or file name cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;           // /api/info
let chosenFiles = [];      // the last files picked or dropped, for "Caption again"
let resultsOffset = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function showError(box, message) {
  box.textContent = message || "";
  box.hidden = !message;
}

// fetch -> {ok, status, data}; a refused upload or a dead server becomes a message, not a throw
async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    return { ok: false, status: 0, data: { error: "the server did not answer (is serve.py still running?) or closed the upload: requests over " + mb(info && info.limits.max_request_bytes) + " are refused" } };
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = { error: "unexpected answer from the server (HTTP " + response.status + ")" }; }
  return { ok: response.ok, status: response.status, data };
}

const mb = (bytes) => bytes ? (bytes / 1048576).toFixed(0) + " MB" : "?";
const fmt = (x, digits = 3) => (typeof x !== "number" ? String(x) : Number.isInteger(x) ? String(x) : x.toFixed(digits));

// ---- tabs ------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
    for (const view of ["caption", "results", "search"]) $("view-" + view).hidden = view !== tab.dataset.view;
    if (tab.dataset.view === "results" && !$("rows").childElementCount) loadRun(true);
  });
}

async function loadInfo() {
  const { ok, data } = await call("/api/info");
  if (!ok) { $("model-info").textContent = data.error; return; }
  info = data;
  const c = data.captioner;
  $("model-info").textContent = c === null ? "No captioning model loaded (start serve.py with --model DIR)."
    : `Model ${c.model || "(unnamed)"}: ${c.variant || ""}, ${c.feature_dim || "?"}-d features` +
      (c.encoder ? `, new photos through ${c.encoder}` : "") +
      (c.cached_images ? `, ${c.cached_images} dataset images with cached features` : "") +
      (c.no_encoder ? ` (${c.no_encoder})` : "") + ".";
  const l = data.limits;
  $("limits").textContent = `Up to ${l.max_images} photos at a time, ${mb(l.max_image_bytes)} each, ` +
    `${(l.max_pixels / 1e6).toFixed(0)} M pixels at most; JPEG, PNG, GIF, BMP, WebP or TIFF.`;
  for (let k = 1; k <= l.max_beam; k++) $("beam").append(el("option", { value: k, text: k === 1 ? "1 (greedy)" : String(k) }));
  $("beam").value = data.beam_default;
  for (const run of data.runs) $("run").append(el("option", { value: run, text: run }));
  if (!data.runs.length) $("run").append(el("option", { value: "", text: "(no results folder)" }));
  if (data.retrieval === null) showError($("search-error"), "No retrieval model is loaded, so text search is not available.");
}

// ---- caption view ----------------------------------------------------------------------------
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  captionFiles([...e.dataTransfer.files]);
});
$("files").addEventListener("change", (e) => captionFiles([...e.target.files]));
$("again").addEventListener("click", () => captionFiles(chosenFiles));

async function captionFiles(files) {
  if (!files.length) return;
  chosenFiles = files;
  $("again").disabled = true;
  showError($("caption-error"), "");
  $("cards").replaceChildren();
  $("caption-status").textContent = `captioning ${files.length} photo(s)…`;
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  form.append("beam", $("beam").value);
  const { data } = await call("/api/caption", { method: "POST", body: form });
  $("again").disabled = false;
  $("caption-status").textContent = data.results ? `done in ${fmt(data.seconds, 2)} s (beam ${data.beam})` : "";
  if (!data.results) { showError($("caption-error"), data.error); return; }
  const refused = data.results.filter((r) => r.error).length;
  if (refused) showError($("caption-error"), `${refused} of ${data.results.length} file(s) refused; see below.`);
  data.results.forEach((result, i) => $("cards").append(card(result, files[i])));
}

function card(result, file) {
  const url = file ? URL.createObjectURL(file) : null;
  if (result.error) {
    return el("div", { class: "card refused" },
      el("div", { class: "body" }, el("div", { class: "name", text: result.name }),
        el("div", { class: "error", text: result.error })));
  }
  const photo = el("img", { class: "photo", alt: result.name, src: url });
  const beams = el("table", {}, el("tr", {}, el("th", { text: "#" }), el("th", { text: "beam-search caption" }),
    el("th", { class: "num", text: "score", title: "sum of log-probabilities / length^alpha" })));
  result.beams.forEach((b, i) => beams.append(el("tr", {}, el("td", { text: String(i + 1) }),
    el("td", { text: b.caption + (b.finished === false ? " … (cut at the length limit)" : "") }),
    el("td", { class: "num", text: fmt(b.score) }))));
  const body = el("div", { class: "body" },
    el("div", { class: "name", text: `${result.name} · ${result.width}×${result.height} · ${result.features || ""}` }),
    el("div", { class: "muted", text: "greedy" }),
    el("div", { class: "greedy", text: result.greedy }),
    beams);
  if (result.attention) body.append(attentionMaps(result.attention, photo));
  if (result.nearest) body.append(hitList("nearest dataset images", result.nearest));
  return el("div", { class: "card" }, photo, body);
}

// one small map per word: the photo, darkened where the model looked least
function attentionMaps(attention, photo) {
  const box = el("div", { class: "attention" });
  const [rows, cols] = attention.grid;
  attention.words.forEach((word, w) => {
    const canvas = el("canvas", { width: 84, height: 84 });
    box.append(el("figure", {}, canvas, el("figcaption", { text: word })));
    const draw = () => {
      const ctx = canvas.getContext("2d");
      ctx.drawImage(photo, 0, 0, 84, 84);
      const weights = attention.weights[w];
      const top = Math.max(...weights) || 1;
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        ctx.fillStyle = `rgba(0,0,0,${0.8 * (1 - weights[r * cols + c] / top)})`;
        ctx.fillRect(c * 84 / cols, r * 84 / rows, 84 / cols + 0.5, 84 / rows + 0.5);
      }
    };
    if (photo.complete) draw(); else photo.addEventListener("load", draw);
  });
  return el("div", {}, el("div", { class: "muted", text: "attention per word" }), box);
}

function hitList(title, hits) {
  const grid = el("div", { class: "grid" });
  for (const hit of hits) {
    grid.append(el("div", { class: "hit" },
      hit.has_image ? el("img", { src: "/api/image/" + encodeURIComponent(hit.image_id), alt: hit.image_id, loading: "lazy" }) : null,
      el("div", { class: "name", text: `${hit.image_id} · score ${fmt(hit.score)}` }),
      ...(hit.captions || []).slice(0, 2).map((c) => el("div", { text: c }))));
  }
  return el("div", {}, el("div", { class: "muted", text: title }), grid);
}

// ---- results view ----------------------------------------------------------------------------
$("show").addEventListener("click", () => loadRun(true));
$("more").addEventListener("click", () => loadRun(false));
$("run").addEventListener("change", () => loadRun(true));

async function loadRun(fresh) {
  const run = $("run").value;
  if (!run) { showError($("results-error"), "No results folder: start serve.py with --results DIR."); return; }
  if (fresh) { resultsOffset = 0; $("rows").replaceChildren(); }
  const params = new URLSearchParams({ min_bleu: $("min-bleu").value || 0, max_bleu: $("max-bleu").value || 1,
    words: $("words").value, sort: $("sort").value, offset: resultsOffset });
  const { ok, data } = await call(`/api/results/${encodeURIComponent(run)}?${params}`);
  showError($("results-error"), ok ? "" : data.error);
  if (!ok) return;
  if (fresh) $("summary").replaceChildren(summaryTables(data));
  for (const row of data.rows) $("rows").append(resultRow(row));
  resultsOffset += data.rows.length;
  $("results-count").textContent = `${data.matched} of ${data.total} captions match; showing ${resultsOffset}. ` +
    `Badge: ${data.row_bleu}.`;
  $("more").hidden = resultsOffset >= data.matched;
}

// results.json: every group of numbers becomes a small table (BLEU per mode, diagnostics, ...)
function summaryTables(data) {
  const s = data.summary;
  const box = el("div", {});
  const facts = ["split", "n_images", "beam", "alpha", "model", "features"].filter((k) => k in s)
    .map((k) => `${k} ${s[k]}`).join(" · ");
  box.append(el("p", { class: "muted", text: facts }));
  const tables = el("div", { class: "summary-tables" });
  const numberTable = (title, obj) => {
    const t = el("table", {}, el("caption", { text: title }));
    for (const [k, v] of Object.entries(obj)) if (typeof v === "number") t.append(el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: fmt(v, 4) })));
    return t;
  };
  for (const [key, value] of Object.entries(s)) {
    if (!value || typeof value !== "object" || Array.isArray(value)) continue;
    const nested = Object.entries(value).filter(([, v]) => v && typeof v === "object");
    if (nested.length) for (const [mode, numbers] of nested) tables.append(numberTable(`${key} (${mode})`, numbers));
    else tables.append(numberTable(key, value));
  }
  box.append(tables);
  if (data.files.includes("gallery.html")) {
    box.append(el("p", {}, el("a", { href: `/results/${encodeURIComponent(data.run)}/gallery.html`, text: "gallery.html" })));
  }
  return box;
}

function resultRow(row) {
  const refs = el("ol", {});
  for (const r of row.references) refs.append(el("li", { text: r }));
  return el("div", { class: "row" },
    row.has_image ? el("img", { src: "/api/image/" + encodeURIComponent(row.image_id), alt: row.image_id, loading: "lazy" }) : null,
    el("div", {}, el("div", { class: "name", text: row.image_id }),
      el("div", {}, el("span", { class: "badge", text: fmt(row.bleu) }), " ", el("b", { text: row.generated })),
      refs));
}

// ---- search view -----------------------------------------------------------------------------
$("search-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("hits").replaceChildren();
  const { ok, data } = await call("/api/search?" + new URLSearchParams({ q: $("query").value }));
  showError($("search-error"), ok ? "" : data.error);
  if (ok) $("hits").append(hitList(`${data.results.length} images for “${data.query}”`, data.results));
});

loadInfo();
