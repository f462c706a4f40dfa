// pagedllm's web page: chat with branches, token probabilities to fork from, the engine at work and
// the model's insides. Plain JavaScript over the server's own routes; no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};
const STORE = "pagedllm.conversations";
const SETTINGS = "pagedllm.sampling";
const TOP_N = 5;

// -- the API: the key lives in this tab's sessionStorage and only ever in an Authorization header ----
async function api(path, body, signal) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("pagedllm.key");
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { method: body ? "POST" : "GET", headers, signal,
                                         body: body ? JSON.stringify(body) : undefined });
    if (response.status !== 401) return response;
    await askKey();
  }
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("#key-dialog");
    $("#key-form").onsubmit = () => { sessionStorage.setItem("pagedllm.key", $("#key-input").value); resolve(); };
    if (!dialog.open) dialog.showModal();
  });
}

async function json(path, body) {
  const response = await api(path, body);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") return;
      yield JSON.parse(line);
    }
  }
}

// -- conversations: a tree of messages per conversation, kept in the browser ------------------------
let conversations = loadConversations();
let current = null;
let controller = null;
const uid = () => Math.random().toString(36).slice(2, 10);
const save = () => localStorage.setItem(STORE, JSON.stringify(conversations));

function loadConversations() {
  try {
    const kept = JSON.parse(localStorage.getItem(STORE) || "[]");
    kept.forEach(checkConversation);
    return kept;
  } catch (error) {  // a store this page cannot read is set aside, not lost
    localStorage.setItem(`${STORE}.unreadable`, localStorage.getItem(STORE));
    return [];
  }
}

function newConversation() {
  current = { id: uid(), title: "New chat", system: $("#system").value, nodes: {}, roots: [], leaf: null };
  conversations.unshift(current);
  save();
  render();
}

function addNode(conv, parent, role, content, tokens) {
  const node = { id: uid(), parent, role, content, tokens: tokens || null, children: [] };
  conv.nodes[node.id] = node;
  (parent ? conv.nodes[parent].children : conv.roots).push(node.id);
  conv.leaf = node.id;
  return node;
}

function path(conv, leaf = conv.leaf) {
  const nodes = [];
  for (let id = leaf; id; id = conv.nodes[id].parent) nodes.unshift(conv.nodes[id]);
  return nodes;
}

function deepestLeaf(conv, id) {
  while (conv.nodes[id].children.length) id = conv.nodes[id].children.at(-1);
  return id;
}

function messagesUpTo(conv, node) {
  const system = conv.system ? [{ role: "system", content: conv.system }] : [];
  return system.concat(path(conv, node.id).map((n) => ({ role: n.role, content: n.content })));
}

// -- rendering ---------------------------------------------------------------------------------------
function markdown(text) {
  const html = DOMPurify.sanitize(marked.parse(text));
  const box = el("div", { class: "body" });
  box.innerHTML = html;
  box.querySelectorAll("pre code").forEach((block) => hljs.highlightElement(block));
  return box;
}

function tokenView(node) {
  const box = el("div", { class: "tokens body" });
  node.tokens.forEach((tok, i) => {
    const p = Math.exp(tok.logprob);
    const span = el("span", { class: "tok", tabindex: 0, title: `${(100 * p).toFixed(1)}%`, "data-index": i },
                    tok.text);
    span.style.background = `hsla(${Math.round(120 * p)}, 80%, 45%, ${0.15 + 0.35 * (1 - p)})`;
    span.addEventListener("click", () => showAlternatives(node, i, span));
    span.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" && e.key !== " ") return;
      e.preventDefault();  // else the key's activation lands on the popover's first button and forks at once
      showAlternatives(node, i, span);
    });
    box.append(span);
  });
  return box;
}

function siblingsOf(conv, node) {
  return node.parent ? conv.nodes[node.parent].children : conv.roots;
}

function messageView(conv, node) {
  const siblings = siblingsOf(conv, node);
  const at = siblings.indexOf(node.id);
  const switchTo = (delta) => { conv.leaf = deepestLeaf(conv, siblings[at + delta]); save(); render(); };
  const role = el("div", { class: "role" }, el("b", {}, node.role),
    siblings.length > 1 ? el("span", { class: "branches" },
      el("button", { "aria-label": "previous branch", disabled: at === 0, onclick: () => switchTo(-1) }, "‹"),
      ` ${at + 1}/${siblings.length} `,
      el("button", { "aria-label": "next branch", disabled: at === siblings.length - 1, onclick: () => switchTo(1) }, "›"))
      : null,
    el("button", { class: "edit", onclick: () => editMessage(conv, node) }, "Edit"),
    node.role === "assistant" ? el("button", { onclick: () => regenerate(conv, node) }, "Regenerate") : null,
    node.role === "assistant" && node.tokens ? el("button", { class: "show-tokens", "aria-pressed": !!node.showTokens,
      onclick: () => { node.showTokens = !node.showTokens; render(); } }, "Tokens") : null,
    el("button", { onclick: () => inspectMessage(conv, node) }, "Inside"));
  const body = node.showTokens && node.tokens ? tokenView(node) : markdown(node.content || "");
  return el("div", { class: `message ${node.role}`, "data-id": node.id }, role, body);
}

function render() {
  const list = $("#conversation-list");
  list.replaceChildren(...conversations.map((c) => el("li", { tabindex: 0, "aria-current": c === current,
    onclick: () => { current = c; render(); }, onkeydown: (e) => { if (e.key === "Enter") { current = c; render(); } } },
    c.title)));
  if (!current) return $("#messages").replaceChildren();
  $("#system").value = current.system || "";
  $("#messages").replaceChildren(...path(current).map((n) => messageView(current, n)));
  $("#messages").scrollTop = $("#messages").scrollHeight;
}

// -- generation: the chat template through /tokenize, then /v1/completions on token ids, so that a fork
// continues from exact tokens and reuses the prefix cache -------------------------------------------------
function samplingBody() {
  const body = {};
  for (const name of ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                      "frequency_penalty", "seed", "max_tokens"]) {
    const value = $(`#${name}`).value;
    if (value !== "") body[name] = Number(value);
  }
  const schema = $("#json_schema").value.trim();
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "schema", schema: JSON.parse(schema) } };
  localStorage.setItem(SETTINGS, JSON.stringify(body));
  return body;
}

async function generate(conv, node, prefix = []) {
  const messages = messagesUpTo(conv, conv.nodes[node.parent]);
  const prompt = (await json("/tokenize", { messages })).tokens;
  node.tokens = prefix.slice();
  node.content = prefix.map((t) => t.text).join("");
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await api("/v1/completions", { ...samplingBody(), prompt: prompt.concat(prefix.map((t) => t.id)),
      stream: true, logprobs: TOP_N, return_token_ids: true }, controller.signal);
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const chunk of sse(response)) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      const lp = choice.logprobs;
      (choice.token_ids || []).forEach((id, i) => node.tokens.push({ id, text: lp.tokens[i], logprob: lp.token_logprobs[i],
        top: Object.entries(lp.top_logprobs[i]).map(([text, logprob], j) => ({ text, logprob, id: lp.top_token_ids[i][j] })) }));
      node.content += choice.text;
      updateStreaming(node);
    }
  } catch (error) {
    if (error.name !== "AbortError") node.content += `\n\n*${error.message}*`;
  } finally {
    setBusy(false);
    save();
    render();
  }
}

function updateStreaming(node) {
  const box = document.querySelector(`.message[data-id="${node.id}"]`);
  if (!box) return render();
  box.querySelector(".body").replaceWith(markdown(node.content));
  $("#messages").scrollTop = $("#messages").scrollHeight;
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
  document.body.dataset.busy = busy;  // what tests (and styles) can wait on
  if (!busy) document.body.dataset.generations = Number(document.body.dataset.generations || 0) + 1;
  if (busy) pollEngine();
}

async function send(text) {
  if (!current) newConversation();
  current.system = $("#system").value;
  if (current.title === "New chat") current.title = text.slice(0, 40);
  addNode(current, current.leaf, "user", text);
  const answer = addNode(current, current.leaf, "assistant", "");
  render();
  await generate(current, answer);
}

const busy = () => !$("#stop").disabled;  // one generation at a time: Stop it first

async function regenerate(conv, node) {
  if (busy()) return;
  const answer = addNode(conv, node.parent, "assistant", "");
  render();
  await generate(conv, answer);
}

// Editing keeps the original: the edit is a new branch beside it. An edited question is answered again; an
// edited answer is kept as written (what the model is then asked next continues from it).
function editMessage(conv, node) {
  const box = document.querySelector(`.message[data-id="${node.id}"]`);
  const area = el("textarea", { class: "edit-text", rows: Math.min(12, node.content.split("\n").length + 1),
                                "aria-label": `edit the ${node.role} message` });
  area.value = node.content;
  const done = async () => {
    if (busy()) return;
    const text = area.value;
    if (text === node.content) return render();
    const edited = addNode(conv, node.parent, node.role, text);
    if (node.role !== "user") { save(); return render(); }
    const answer = addNode(conv, edited.id, "assistant", "");
    render();
    await generate(conv, answer);
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { e.stopPropagation(); render(); }
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); done(); }
  });
  const label = node.role === "user" ? "Save and send" : "Save";
  box.querySelector(".body").replaceWith(el("div", { class: "body editing" }, area,
    el("div", { class: "edit-actions" }, el("button", { class: "save", onclick: done }, label),
      el("button", { onclick: render }, "Cancel"), el("span", { class: "muted" }, " Ctrl+Enter saves, Escape cancels"))));
  area.focus();
}

// -- tokens: alternatives and forks -----------------------------------------------------------------
function showAlternatives(node, index, anchor) {
  const pop = $("#token-popover");
  const tok = node.tokens[index];
  const rect = anchor.getBoundingClientRect();
  pop.replaceChildren(el("div", { class: "muted" }, `position ${index}: continue from another token`),
    ...tok.top.map((alt) => el("button", { class: "alt", onclick: () => { pop.hidden = true; fork(node, index, alt); } },
      el("span", {}, JSON.stringify(alt.text)), el("span", {}, `${(100 * Math.exp(alt.logprob)).toFixed(1)}%`))));
  pop.style.left = `${Math.min(rect.left, innerWidth - 330)}px`;
  pop.style.top = `${rect.bottom + 4}px`;
  pop.hidden = false;
  pop.querySelector("button").focus();
}

document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("#token-popover").hidden = true; });

async function fork(node, index, alt) {
  if (busy()) return;
  const conv = current;
  const branch = addNode(conv, node.parent, "assistant", "");
  branch.showTokens = true;
  render();
  await generate(conv, branch, node.tokens.slice(0, index).concat([{ ...alt, top: [] }]));
}

// -- the engine panel ---------------------------------------------------------------------------------
const rates = [];
let polling = false;

async function pollEngine() {
  if (polling) return;
  polling = true;
  try {
    while (!$("#panel-engine").hidden || !$("#stop").disabled) {
      drawEngine(await json("/v1/engine"));
      await new Promise((r) => setTimeout(r, 400));
    }
  } catch (error) {
    $("#engine-stats").textContent = error.message;
  } finally {
    polling = false;
  }
}

function drawEngine(state) {
  const s = state.stats;
  const used = [...state.blocks].filter((b) => b === "u").length;
  const cached = [...state.blocks].filter((b) => b === "c").length;
  const rows = [["running", s.num_running], ["waiting", s.num_waiting], ["KV blocks in use", `${used} / ${state.blocks.length}`],
    ["cached blocks", cached], ["prefix-cache hit rate", `${(100 * s.prefix_cache_hit_rate).toFixed(1)}%`],
    ["generation tok/s", s.generation_tok_s.toFixed(1)], ["prompt tok/s", s.prompt_tok_s.toFixed(1)],
    ["preemptions", s.num_preemptions], ["tokens generated", s.generation_tokens_total]];
  $("#engine-stats").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-stat": k }, String(v))]));
  $("#block-map").replaceChildren(...[...state.blocks].map((b, i) => el("i", { class: b, title: `block ${i}` })));
  $("#requests tbody").replaceChildren(...state.running.concat(state.waiting).map((r) => el("tr", {},
    ...[r.id.slice(0, 14), r.status, r.prompt_tokens, r.cached_tokens, r.output_tokens, r.blocks].map((v) => el("td", {}, String(v))))));
  drawJobs(state.batch_jobs || []);
  rates.push(s.generation_tok_s);
  if (rates.length > 150) rates.shift();
  drawRates();
}

// Generation tokens/s over the last minute (a point per poll), scaled to the peak it shows.
function drawRates() {
  const canvas = $("#rate-chart"), ctx = canvas.getContext("2d"), style = getComputedStyle(document.body);
  const top = Math.max(1, ...rates), h = canvas.height - 14;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = style.getPropertyValue("--muted");
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(`generation tok/s: now ${rates.at(-1).toFixed(1)}, peak ${top.toFixed(1)}`, 0, 10);
  ctx.strokeStyle = style.getPropertyValue("--line");
  ctx.beginPath();
  ctx.moveTo(0, canvas.height - 0.5);
  ctx.lineTo(canvas.width, canvas.height - 0.5);
  ctx.stroke();
  ctx.strokeStyle = style.getPropertyValue("--accent");
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  rates.forEach((r, i) => ctx.lineTo((i / 149) * canvas.width, canvas.height - 1 - (r / top) * (h - 2)));
  ctx.stroke();
}

const NO_JOBS = $("#batch-jobs").firstElementChild;

function drawJobs(jobs) {
  if (!jobs.length) return $("#batch-jobs").replaceChildren(NO_JOBS);
  const duration = (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
  $("#batch-jobs").replaceChildren(...jobs.map((j) => {
    const left = j.rows - j.done;
    const eta = j.state === "running" && j.rows_per_s > 0 && left > 0 ? `, ${duration(Math.ceil(left / j.rows_per_s))} left` : "";
    return el("li", { "data-job-state": j.state, "data-job-done": j.done },
      el("div", {}, el("b", {}, j.input), ` → ${j.output} `, el("span", { class: `job-state ${j.state}` }, j.state)),
      el("progress", { max: Math.max(1, j.rows), value: j.done, "aria-label": `${j.input}: ${j.done} of ${j.rows} rows` }),
      el("div", { class: "muted" }, `${j.done} / ${j.rows} rows (${j.errors} errors), ${j.workers} worker${j.workers > 1 ? "s" : ""}, ` +
        `${j.rows_per_s.toFixed(2)} rows/s, ${j.tokens_per_s.toFixed(1)} tok/s${eta}`),
      j.message ? el("div", { class: "job-message" }, j.message) : null);
  }));
}

// -- inside: the workshop's probes on the conversation up to a message ------------------------------
async function inspectMessage(conv, node, layer = null, head = 0) {
  selectPanel("inside");
  $("#inside-hint").hidden = true;
  const body = $("#inside-body");
  body.replaceChildren(el("p", { class: "muted" }, "probing…"));
  try {
    const first = await json("/v1/inspect", { messages: messagesUpTo(conv, node), top_k: 3 });
    const layers = first.layers.length;
    layer = layer === null ? layers - 1 : layer;
    const probe = await json("/v1/inspect", { messages: messagesUpTo(conv, node), top_k: 3, layers: [layer],
                                               attention: [`${layer}:${head}`] });
    body.replaceChildren(lensTable(first), cosineCurve(first), attentionView(conv, node, probe, layer, head, layers));
  } catch (error) {
    body.replaceChildren(el("p", {}, error.message));
  }
}

function lensTable(result) {
  const text = (id) => JSON.stringify(result.vocab[id] ?? String(id));
  return el("table", { class: "lens" }, el("thead", {}, el("tr", {}, el("th", {}, "layer"), el("th", {}, "cos"),
    el("th", {}, "logit lens (last position)"))),
    el("tbody", {}, ...result.layers.map((l) => el("tr", {}, el("td", {}, String(l.layer)),
      el("td", {}, l.cos_distance.toFixed(3)),
      el("td", {}, l.top_k.map(([id, lp]) => `${text(id)} ${(100 * Math.exp(lp)).toFixed(0)}%`).join(", "))))));
}

function cosineCurve(result) {
  const w = 300, h = 90, values = result.layers.map((l) => l.cos_distance);
  const top = Math.max(1e-6, ...values);
  const points = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * (w - 10) + 5},${h - 5 - (v / top) * (h - 10)}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "cosine");
  svg.setAttribute("aria-label", "cosine distance per layer");
  svg.innerHTML = `<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="${points.join(" ")}"/>`;
  return el("figure", {}, svg, el("figcaption", { class: "muted" }, "cosine distance, input → output, per layer"));
}

function attentionView(conv, node, probe, layer, head, layers) {
  const att = probe.attention[0];
  const keep = Math.min(att.queries.length, 32);  // the last tokens: a readable grid
  const rows = att.weights[0].slice(-keep).map((row) => row.slice(-keep));
  const grid = el("div", { class: "heatmap", "aria-label": `attention, layer ${layer}, head ${head}` });
  grid.style.gridTemplateColumns = `repeat(${keep}, 1fr)`;
  rows.forEach((row, i) => row.forEach((w, j) => {
    const cell = el("span", { title: `${JSON.stringify(probe.tokens.at(-keep + i))} → ${JSON.stringify(probe.tokens.at(-keep + j))}: ${w.toFixed(3)}` });
    cell.style.background = `rgba(37, 99, 235, ${Math.sqrt(w)})`;
    grid.append(cell);
  }));
  const pick = (label, value, count, onchange) => el("label", {}, label, el("select", { onchange: (e) => onchange(Number(e.target.value)) },
    ...Array.from({ length: count }, (_, i) => el("option", { value: i, selected: i === value }, String(i)))));
  return el("div", {}, el("h3", {}, "Attention (last tokens)"),
    pick("layer ", layer, layers, (l) => inspectMessage(conv, node, l, head)),
    pick("head ", head, probe.num_heads, (h) => inspectMessage(conv, node, layer, h)), grid);
}

// -- wiring -------------------------------------------------------------------------------------------
function selectPanel(name) {
  document.querySelectorAll("[role=tab]").forEach((t) => t.setAttribute("aria-selected", t.dataset.panel === name));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== `panel-${name}`; });
  if (name === "engine") pollEngine();
}

document.querySelectorAll("[role=tab]").forEach((t) => t.addEventListener("click", () => selectPanel(t.dataset.panel)));
$("#composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#input").value.trim();
  if (!text || busy()) return;
  $("#input").value = "";
  send(text);
});
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#composer").requestSubmit(); }
});
$("#stop").addEventListener("click", () => controller && controller.abort());
$("#new-chat").addEventListener("click", newConversation);
$("#system").addEventListener("change", () => { if (current) { current.system = $("#system").value; save(); } });
$("#export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify(conversations, null, 1)], { type: "application/json" });
  el("a", { href: URL.createObjectURL(blob), download: "pagedllm-conversations.json" }).click();
});
$("#import").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";  // the same file may be chosen again
  let imported;
  try {
    imported = JSON.parse(await file.text());
    if (!Array.isArray(imported)) throw new Error("the file holds no list of conversations");
    imported.forEach(checkConversation);
  } catch (error) {
    $("#notice").textContent = `Not imported: ${error.message}`;
    return;
  }
  conversations = imported.concat(conversations.filter((c) => !imported.some((i) => i.id === c.id)));
  current = conversations[0] || null;
  $("#notice").textContent = `Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"}.`;
  save();
  render();
});

// An imported file is untrusted: every conversation must be a well-formed tree of messages (its text is
// rendered through DOMPurify like any other).
function checkConversation(c, i) {
  const fail = (why) => { throw new Error(`conversation ${i + 1}: ${why}`); };
  if (!c || typeof c !== "object" || typeof c.id !== "string" || typeof c.title !== "string") fail("no id or title");
  if (!c.nodes || typeof c.nodes !== "object" || !Array.isArray(c.roots)) fail("no message tree");
  for (const [id, n] of Object.entries(c.nodes)) {
    if (!n || n.id !== id || !["user", "assistant"].includes(n.role) || typeof n.content !== "string") fail(`message ${id} is malformed`);
    if (!Array.isArray(n.children) || n.children.some((k) => !c.nodes[k] || c.nodes[k].parent !== id)) fail(`message ${id} has unknown children`);
    if (n.parent !== null && !c.nodes[n.parent]) fail(`message ${id} has an unknown parent`);
    const tokenOk = (t) => t && typeof t.text === "string" && typeof t.logprob === "number" && Array.isArray(t.top);
    if (n.tokens !== null && n.tokens !== undefined && !(Array.isArray(n.tokens) && n.tokens.every(tokenOk))) {
      fail(`message ${id} has malformed tokens`);
    }
    let steps = 0;  // up to a root, without a cycle
    for (let up = n; up.parent !== null; up = c.nodes[up.parent]) if (++steps > Object.keys(c.nodes).length) fail("the messages form a cycle");
    if (steps === 0 && !c.roots.includes(id)) fail(`message ${id} has no parent and is not a root`);
  }
  if (c.roots.some((r) => !c.nodes[r]) || (c.leaf !== null && !c.nodes[c.leaf])) fail("unknown root or leaf message");
  if (c.system !== undefined && typeof c.system !== "string") fail("the system prompt is not text");
}

(async function start() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const [name, value] of Object.entries(saved)) if ($(`#${name}`)) $(`#${name}`).value = value;
  current = conversations[0] || null;
  render();
  const models = await json("/v1/models");
  $("#model-name").textContent = models.data[0].id;
})();
