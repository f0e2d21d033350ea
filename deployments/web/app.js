// The Pusa web page: four tabs over one form, the plan's heat map, a job's live progress, its result and
// the caller's gallery. Public API only: /health, /openapi.json, /v1/models, /v1/loras and /v1/videos*. Every field's range and
// default comes from the OpenAPI schema of POST /v1/videos (the API's own validation), every error is
// shown next to the field the API's 400 names (`error.param`).

import { ApiError, api, apiKey, blobUrl, eventStream, getJSON } from "./api.js";
import { cellAt, drawHeatmap } from "./heatmap.js";
import { Strip, pixelFrame } from "./strip.js";

const $ = (selector) => document.querySelector(selector);
const form = $("#request-form");
const TASKS = ["i2v", "multi_frame", "v2v", "t2v"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const ALIASES = { width: "size", height: "size", input_reference: "images", video_id: "video" };

const state = {
  task: "i2v",
  schema: {},
  defaults: null, // the selected model's size and frames, from the plan of a bare request
  models: {}, // the served models (GET /v1/models), each one's plan of a bare request (its defaults)
  items: { i2v: [{ key: "image-0", file: null, thumb: null, position: 0, multiplier: "" }], multi_frame: [], v2v: [] },
  selected: { i2v: "image-0", multi_frame: null, v2v: null },
  nextKey: 1,
  plan: null,
  planAbort: null,
  planTimer: null,
  touched: false, // the plan's errors show once the user has changed something
  job: null, // {id, abort, lastEventId, retries, step, total, steps (a window's), segment, windows}
  resultUrls: [],
  windowUrls: [], // the finished windows of a long video, as blob URLs
  loras: [], // the deployment's LoRA registry: [{name, alpha, fast}], from GET /v1/loras
  loraRows: [], // the picker's choices: [{name, alpha}] (alpha "" for the registry's default)
  extensionDefaults: null, // the overlap's noise multipliers when left out, from a long video's plan
  gallery: { cursors: [null], lastId: null, urls: [] },
};

// -- errors ----------------------------------------------------------------------------------------

function fieldFor(param) {
  if (!param) return null;
  let name = String(param).split(/[.[]/)[0];
  name = ALIASES[name] || name;
  const field = document.querySelector(`.field[data-param="${CSS.escape(name)}"]`);
  return field && !field.closest("[hidden]") ? field : null;
}

/** Clear the errors shown in `scope` (the job panel's own only when `scope` is in it). */
function clearErrors(scope = document) {
  const own = (el) => !el.closest("#job") || scope.closest?.("#job") || scope === $("#job");
  for (const field of scope.querySelectorAll(".field.invalid")) if (own(field)) field.classList.remove("invalid");
  for (const p of scope.querySelectorAll(".field-error")) if (own(p)) p.textContent = "";
}

/** Show `error` next to the field it names; elsewhere next to `fallback` (a .field), else under the form. */
function showError(error, fallback = null) {
  if (!(error instanceof ApiError)) console.error(error);
  const param = error instanceof ApiError ? (error.status === 401 ? "api_key" : error.param) : null;
  if (error instanceof ApiError && error.status === 401) $("#key-box").hidden = false;
  const field = fieldFor(param) || fallback || $('.field[data-param="request"]');
  field.classList.add("invalid");
  field.closest("details")?.setAttribute("open", "");
  field.querySelector(".field-error").textContent = error.message || String(error);
}

// -- the schema ------------------------------------------------------------------------------------

function variant(property) {
  // `anyOf: [X, null]` -> X, with the outer default and description
  const inner = (property.anyOf || []).find((v) => v.type !== "null") || property;
  return { ...inner, default: property.default, description: property.description ?? inner.description };
}

function rangeText(s) {
  const low = s.minimum ?? (s.exclusiveMinimum != null ? `>${s.exclusiveMinimum}` : null);
  const safe = s.maximum != null && Math.abs(s.maximum) <= Number.MAX_SAFE_INTEGER;
  const parts = [];
  if (low != null && safe) parts.push(`${low} – ${s.maximum}`);
  else if (low != null) parts.push(String(low).startsWith(">") ? low : `≥ ${low}`);
  else if (safe) parts.push(`≤ ${s.maximum}`);
  if (s.maxLength != null) parts.push(`up to ${s.maxLength} characters`);
  return parts.join(", ");
}

// fields the page sends from its own controls rather than from a [data-schema] one
const SPECIAL = new Set(["task", "images", "input_reference", "video", "positions", "multipliers", "width", "height"]);

/** A control for each schema property the page has none for, so a field the API gains is on the page. */
function addGenericControls() {
  const box = $("#other-params");
  const handled = new Set([...form.querySelectorAll("[data-schema]")].map((el) => el.dataset.schema));
  for (const [name, property] of Object.entries(state.schema)) {
    if (handled.has(name) || SPECIAL.has(name)) continue;
    const s = variant(property);
    const field = document.createElement("div");
    field.className = "field";
    field.dataset.param = name;
    const label = document.createElement("label");
    label.htmlFor = `f-${name}`;
    label.textContent = property.title || name;
    let control;
    if (s.enum) {
      control = document.createElement("select");
    } else {
      control = document.createElement("input");
      control.type = s.type === "integer" || s.type === "number" ? "number" : "text";
      if (s.type === "array" || s.type === "object") {
        const keys = Object.keys(s.items?.properties || s.properties || {});
        const example = Object.fromEntries(keys.map((k) => [k, "…"]));
        control.placeholder = JSON.stringify(s.type === "array" ? [example] : example) + " (JSON)";
        control.dataset.json = "true";
      }
    }
    control.id = `f-${name}`;
    control.name = name;
    control.dataset.schema = name;
    const hint = document.createElement("small");
    hint.className = "hint";
    const error = document.createElement("p");
    error.className = "field-error";
    error.setAttribute("role", "alert");
    field.append(label, control, hint, error);
    box.append(field);
  }
  box.hidden = box.querySelectorAll(".field").length === 0;
}

/** Types, ranges, choices and defaults of every [data-schema] control, from the VideoCreate schema. */
function applySchema(spec) {
  const body = spec.paths["/v1/videos"].post.requestBody.content["application/json"].schema;
  state.schema = body.properties;
  const required = new Set(body.required || []);
  addGenericControls();
  for (const el of form.querySelectorAll("[data-schema]")) {
    const property = state.schema[el.dataset.schema];
    if (!property) continue;
    const s = variant(property);
    if (el.tagName === "SELECT") {
      el.replaceChildren(...[...(s.default == null ? [""] : []), ...s.enum].map((value) => new Option(value, value)));
      el.value = s.default ?? s.enum[0];
    } else if (el.type === "checkbox") {
      // sends its own value (one of the enum's) when checked, nothing (the default) when not
    } else if (!["INPUT", "TEXTAREA"].includes(el.tagName)) {
      // a group of controls for a list: its number inputs take the range of the list's items
      const item = s.items || {};
      for (const input of el.querySelectorAll("input[type=number]")) {
        if (item.minimum != null) input.min = item.minimum;
        if (item.maximum != null) input.max = item.maximum;
        input.step = "any";
      }
    } else {
      if (s.type === "integer" || s.type === "number") {
        if (s.minimum != null) el.min = s.minimum;
        if (s.exclusiveMinimum != null) el.min = s.exclusiveMinimum;
        if (s.maximum != null && Math.abs(s.maximum) <= Number.MAX_SAFE_INTEGER) el.max = s.maximum;
        el.step = s.type === "integer" ? "1" : "any";
      }
      if (s.maxLength != null) el.maxLength = s.maxLength;
      if (s.const != null) el.value = s.const;
      else if (s.default != null && !el.dataset.json) el.value = s.default;
    }
    const hint = el.closest(".field")?.querySelector(".hint");
    if (hint && !hint.textContent) {
      const range = rangeText(s);
      const name = el.dataset.schema;
      const extra = required.has(name) ? "required"
        : s.const != null ? "" : s.default == null || el.dataset.json ? "empty: the API's default"
        : `default ${String(s.default).length > 24 ? "as filled in" : s.default}`;
      hint.textContent = [range, s.description, extra].filter(Boolean).join(" · ");
    }
  }
  const video = state.schema.video && variant(state.schema.video);
  if (video?.description) $('[data-schema-hint="video"]').textContent = video.description;
  const multiplier = variant(state.schema.noise_multiplier || {});
  state.multiplierRange = { min: multiplier.minimum ?? 0, max: multiplier.maximum ?? 1 };
}

// -- the tabs and their media ----------------------------------------------------------------------

const items = () => state.items[state.task] || [];

function isHidden(el) {
  return !!el.closest("[hidden]");
}

function setTask(task) {
  state.task = TASKS.includes(task) ? task : "i2v";
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    const active = tab.dataset.task === state.task;
    tab.setAttribute("aria-selected", String(active));
    tab.classList.toggle("active", active);
  }
  for (const el of form.querySelectorAll("[data-tasks]")) el.hidden = !el.dataset.tasks.split(" ").includes(state.task);
  form.dataset.task = state.task;
  const input = $("#f-images");
  input.multiple = state.task === "multi_frame";
  $("#images-label").textContent = state.task === "i2v" ? "Image (the first frame, or any frame you place)" : "Images (two or more keyframes)";
  $("#images-hint").textContent = state.task === "i2v"
    ? "sent as input_reference; PNG, JPEG or WebP"
    : "add files one by one or several at once; sent as images, in this order";
  $("#strip-help").textContent = state.task === "v2v"
    ? "click a latent frame to keep it from the input video, drag to move; none: the mode's default"
    : "click a latent frame to place the selected image, drag an image to move it";
  if (history.replaceState) history.replaceState(null, "", `#${state.task}`);
  clearErrors();
  state.plan = null;
  renderMedia();
  schedulePlan();
}

/** Latent frames of the current form (of its first window when it is a long video). */
function latentFrames() {
  const fps = Number(form.elements.fps.value) || 25;
  let frames = Number(form.elements.frames.value);
  const seconds = Number(form.elements.seconds.value);
  if (!frames && seconds > 0) frames = 4 * Math.max(0, Math.round((seconds * fps) / 4)) + 1;
  if (!frames) frames = state.defaults?.frames || 1;
  const windowFrames = Number(form.elements.window_frames.value) || state.defaults?.frames || frames;
  frames = Math.min(frames, windowFrames); // positions are in the first window
  return Math.max(1, Math.floor((frames - 1) / 4) + 1);
}

function freeCell(taken, frames, preferred) {
  if (!taken.has(preferred) && preferred < frames) return preferred;
  for (let i = 0; i < frames; i++) if (!taken.has(i)) return i;
  return Math.min(preferred, frames - 1);
}

function addFiles(files) {
  if (state.task === "i2v") {
    const item = state.items.i2v[0];
    if (item.thumb) URL.revokeObjectURL(item.thumb);
    Object.assign(item, { file: files[0], thumb: URL.createObjectURL(files[0]) });
  } else {
    const list = state.items.multi_frame;
    const frames = latentFrames();
    for (const file of files) {
      list.push({ key: `image-${state.nextKey++}`, file, thumb: URL.createObjectURL(file), position: -1, multiplier: "" });
    }
    // new images spread over the video like the API's default (first and last, then evenly), on free cells
    const count = list.length;
    const taken = new Set(list.filter((it) => it.position >= 0).map((it) => it.position));
    list.forEach((it, i) => {
      if (it.position >= 0) return;
      const spread = count > 1 ? Math.round((i * (frames - 1)) / (count - 1)) : 0;
      it.position = freeCell(taken, frames, spread);
      taken.add(it.position);
    });
    state.selected.multi_frame ??= list[0]?.key ?? null;
  }
  renderMedia();
  schedulePlan();
}

function removeItem(key) {
  const list = state.items[state.task];
  const index = list.findIndex((it) => it.key === key);
  if (index < 0) return;
  if (list[index].thumb) URL.revokeObjectURL(list[index].thumb);
  list.splice(index, 1);
  if (state.selected[state.task] === key) state.selected[state.task] = list[0]?.key ?? null;
  renderMedia();
  schedulePlan();
}

/** Put item `key` on latent frame `cell`; an item already there takes its old place. */
function place(key, cell) {
  const list = items();
  const item = list.find((it) => it.key === key);
  if (!item) return;
  const other = list.find((it) => it.position === cell && it !== item);
  if (other) other.position = item.position;
  item.position = cell;
  renderMedia();
  schedulePlan();
}

const strip = new Strip($("#strip"), {
  onPlace(cell) {
    const list = items();
    if (state.task === "v2v") {
      if (!list.some((it) => it.position === cell)) {
        const key = `frame-${state.nextKey++}`;
        list.push({ key, position: cell, multiplier: "" });
        state.selected.v2v = key;
      }
      renderMedia();
      schedulePlan();
      return;
    }
    const key = state.selected[state.task] ?? list.find((it) => it.position < 0)?.key;
    if (key == null) return;
    place(key, cell);
    const index = list.findIndex((it) => it.key === key); // then the next image, for placing in turn
    if (state.task === "multi_frame" && list.length > 1) state.selected.multi_frame = list[(index + 1) % list.length].key;
    renderMedia();
  },
  onMove: place,
  onSelect(key) {
    state.selected[state.task] = key;
    renderMedia();
  },
});

function plannedMultipliers() {
  const ghosts = new Map();
  if (state.plan && state.plan.task === state.task) {
    for (const c of state.plan.conditioning) ghosts.set(c.latent_index, c.multiplier);
  }
  return ghosts;
}

function renderStrip() {
  const list = items();
  strip.render(latentFrames(), list.map((it, i) => ({
    key: it.key, position: it.position, thumb: it.thumb,
    label: state.task === "v2v" ? "video" : state.task === "i2v" ? (it.file ? "image" : "image (none yet)") : `#${i + 1}`,
  })), state.selected[state.task], plannedMultipliers());
}

/** After a new plan: the strip's conditioned frames and the multipliers' defaults, the inputs kept (focus). */
function showPlanned() {
  const ghosts = plannedMultipliers();
  const drawn = JSON.stringify([...strip.ghosts]);
  if (JSON.stringify([...ghosts]) !== drawn || strip.frames !== latentFrames()) renderStrip();
  for (const li of $("#position-list").children) {
    const item = items().find((it) => it.key === li.dataset.key);
    if (item) li.querySelector("input.mult").placeholder = ghosts.has(item.position) ? `${ghosts.get(item.position)} (default)` : "default";
  }
}

function renderMedia() {
  const frames = latentFrames();
  for (const it of items()) if (it.position >= frames) it.position = frames - 1;
  const list = items();
  const ghosts = plannedMultipliers();
  renderStrip();

  const images = $("#image-list");
  images.replaceChildren(...(state.task === "v2v" || state.task === "t2v" ? [] : list.filter((it) => it.file).map((it, i) => {
    const li = document.createElement("li");
    li.dataset.key = it.key;
    const img = document.createElement("img");
    img.src = it.thumb;
    img.alt = it.file.name;
    const name = document.createElement("span");
    name.textContent = state.task === "i2v" ? it.file.name : `#${i + 1} ${it.file.name}`;
    li.append(img, name);
    if (state.task === "multi_frame") li.append(button("✕", `remove ${it.file.name}`, () => removeItem(it.key)));
    return li;
  })));

  const rows = list.map((it, i) => {
    const li = document.createElement("li");
    li.dataset.key = it.key;
    li.classList.toggle("selected", it.key === state.selected[state.task]);
    const title = document.createElement("span");
    title.textContent = state.task === "v2v" ? "video frame" : state.task === "i2v" ? "image" : `#${i + 1}`;
    const pos = document.createElement("input");
    Object.assign(pos, { type: "number", min: 0, max: frames - 1, step: 1, value: it.position, className: "pos" });
    pos.setAttribute("aria-label", `latent frame of ${title.textContent}`);
    pos.addEventListener("change", (e) => {
      e.stopPropagation();
      const value = Math.round(Number(pos.value));
      if (Number.isFinite(value) && value >= 0 && value < frames) place(it.key, value);
    });
    const pixel = document.createElement("span");
    pixel.className = "pixel";
    pixel.textContent = `latent ${it.position} = pixel frame ${pixelFrame(it.position)}`;
    const mult = document.createElement("input");
    Object.assign(mult, { type: "number", step: "any", value: it.multiplier, className: "mult",
                          min: state.multiplierRange?.min ?? 0, max: state.multiplierRange?.max ?? 1 });
    mult.placeholder = ghosts.has(it.position) ? `${ghosts.get(it.position)} (default)` : "default";
    mult.setAttribute("aria-label", `noise multiplier of ${title.textContent}`);
    mult.addEventListener("input", (e) => {
      e.stopPropagation();
      it.multiplier = mult.value.trim();
      schedulePlan();
    });
    li.append(title, pos, pixel, mult);
    if (state.task === "v2v") li.append(button("✕", "remove this position", () => removeItem(it.key)));
    return li;
  });
  $("#position-list").replaceChildren(...rows);
}

/** The LoRA picker: one row per chosen LoRA, a name of the registry and an alpha (empty: its default). */
function renderLoras() {
  const alphaRange = variant(state.schema.loras?.items?.properties?.alpha || {});
  const rows = state.loraRows.map((row, i) => {
    const li = document.createElement("li");
    const select = document.createElement("select");
    select.append(...state.loras.map((l) => new Option(l.fast ? `${l.name} (fast)` : l.name, l.name)));
    select.value = row.name;
    select.setAttribute("aria-label", `LoRA ${i + 1}`);
    const alpha = document.createElement("input");
    Object.assign(alpha, { type: "number", step: "any", value: row.alpha, className: "alpha",
                           min: alphaRange.minimum ?? 0, max: alphaRange.maximum ?? 5 });
    alpha.setAttribute("aria-label", `alpha of LoRA ${i + 1}`);
    const showDefault = () => {
      alpha.placeholder = `${state.loras.find((l) => l.name === row.name)?.alpha ?? ""} (default)`;
    };
    showDefault();
    select.addEventListener("change", () => {
      row.name = select.value;
      showDefault();
      schedulePlan();
    });
    alpha.addEventListener("input", () => { row.alpha = alpha.value.trim(); });
    li.append(select, alpha, button("✕", `remove LoRA ${i + 1}`, () => {
      state.loraRows.splice(i, 1);
      renderLoras();
      schedulePlan();
    }));
    return li;
  });
  $("#lora-list").replaceChildren(...rows);
  $("#add-lora").disabled = state.loraRows.length >= (state.schema.loras?.maxItems ?? 4);
}

/** GET /v1/loras: the picker's names; no picker when the registry is empty (or the route is missing). */
async function loadLoras() {
  try {
    state.loras = (await getJSON("v1/loras")).data;
  } catch (error) {
    state.loras = [];
    if (!(error instanceof ApiError && error.status === 404)) showError(error);
  }
  $("#lora-box").hidden = state.loras.length === 0;
  const fast = state.loras.find((l) => l.fast);
  const hint = $('.field[data-param="mode"] .hint');
  hint.dataset.description ??= hint.textContent; // the schema's
  hint.textContent = `${hint.dataset.description} · ${fast ? `the fast LoRA here: ${fast.name}` : "no fast LoRA here"}`;
  state.loraRows = state.loraRows.filter((row) => state.loras.some((l) => l.name === row.name));
  renderLoras();
}

/** Fast mode leaves steps and guidance to the API (4 and 1) unless the user sets them; off again, they come back. */
function setFast(on) {
  for (const el of [form.elements.steps, form.elements.guidance]) {
    if (on) {
      el.dataset.standard = el.value;
      el.value = "";
      el.placeholder = "set by fast mode";
    } else {
      if (el.value === "") el.value = el.dataset.standard ?? "";
      el.placeholder = "";
    }
  }
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// -- requests --------------------------------------------------------------------------------------

/** Whether a named control of the form sends nothing: hidden, empty or unchecked. */
function unset(el) {
  return isHidden(el) || el.value.trim() === "" || (el.type === "checkbox" && !el.checked);
}

/** The fields of the controls that have no name: the LoRA picker's list and the overlap's multipliers. */
function appendLists(body) {
  const loras = state.loraRows.map((row) => (row.alpha === "" ? { name: row.name } : { name: row.name, alpha: row.alpha }));
  if (loras.length && !isHidden($("#lora-box"))) body.append("loras", JSON.stringify(loras));
  const overlap = [...form.querySelectorAll(".ext-mult")].map((el) => el.value.trim());
  if (overlap.some((v) => v !== "")) { // the ones left empty at their defaults, when a plan told them
    body.append("extension_multipliers", overlap.map((v, i) => v || (state.extensionDefaults?.[i] ?? "")).join(","));
  }
}

/** The form as the multipart body of POST /v1/videos for the current tab. */
function requestBody() {
  const body = new FormData();
  const task = state.task;
  body.append("task", task);
  for (const el of form.querySelectorAll("[name]")) {
    if (el.name === "positions_unit" || unset(el)) continue;
    body.append(el.name, el.value.trim());
  }
  appendLists(body);
  const list = items();
  if (task === "i2v" && list[0].file) body.append("input_reference", list[0].file, list[0].file.name);
  if (task === "multi_frame") for (const it of list) body.append("images", it.file, it.file.name);
  if (task === "v2v") {
    const file = $("#f-video").files[0];
    const id = $("#f-video-id").value.trim();
    if (file) body.append("video", file, file.name);
    else if (id) body.append("video", id);
  }
  if (task !== "t2v" && list.length) {
    const unit = form.elements.positions_unit.value;
    body.append("positions_unit", unit);
    body.append("positions", list.map((it) => (unit === "pixel" ? pixelFrame(it.position) : it.position)).join(","));
    if (list.some((it) => it.multiplier !== "")) body.append("multipliers", list.map((it) => it.multiplier).join(","));
  }
  return body;
}

function schedulePlan() {
  clearTimeout(state.planTimer);
  state.planTimer = setTimeout(() => refreshPlan().catch(() => {}), 300);
}

/** POST the form to /v1/videos/plan and draw the heat map; errors go next to their fields. */
async function refreshPlan() {
  clearTimeout(state.planTimer);
  state.planAbort?.abort();
  const abort = (state.planAbort = new AbortController());
  const canvas = $("#heatmap");
  try {
    const plan = await getJSON("v1/videos/plan", { method: "POST", body: requestBody(), signal: abort.signal });
    if (abort.signal.aborted) return null;
    clearErrors(form);
    state.plan = plan;
    drawHeatmap(canvas, plan);
    canvas.classList.remove("stale");
    canvas.dataset.task = plan.task;
    const length = plan.windows
      ? `${plan.frames} frames in ${plan.windows.length} windows of ${plan.window_frames} (${plan.latent_frames} latent), ` +
        `${plan.steps.length} steps each`
      : `${plan.frames} frames (${plan.latent_frames} latent), ${plan.steps.length} steps`;
    const loras = plan.loras.map((l) => `${l.name} ${l.alpha}`).join(", ");
    $("#plan-summary").textContent = `${plan.width}×${plan.height}, ${length} × ${plan.cfg_passes_per_step} passes` +
      `${plan.mode === "fast" ? ", fast" : ""}${loras ? `, LoRAs ${loras}` : ""}, about ${plan.cost_gpu_s} GPU-s`;
    if (plan.mode === "fast") {
      if (form.elements.steps.value === "") form.elements.steps.placeholder = `${plan.steps.length} (fast mode)`;
      if (form.elements.guidance.value === "") form.elements.guidance.placeholder = `${plan.guidance} (fast mode)`;
    }
    showWindows(plan);
    showPlanned();
    return plan;
  } catch (error) {
    if (error.name === "AbortError") return null;
    clearErrors(form);
    canvas.classList.add("stale");
    if (state.touched || !(error instanceof ApiError)) showError(error); // not before the user did anything
    throw error;
  }
}

/** A long video's windows under the heat map (which shows the first one's steps), as wide as the frames each adds. */
function showWindows(plan) {
  const box = $("#plan-windows");
  const windows = plan.windows || [];
  box.hidden = windows.length === 0;
  box.dataset.windows = String(windows.length || 1);
  box.replaceChildren(...windows.map((w, i) => {
    const div = document.createElement("div");
    div.className = "window";
    div.style.flexGrow = String(w.new_frames);
    div.textContent = i ? `${i + 1}: +${w.new_frames}` : `window 1: ${w.frames} frames`;
    div.title = `window ${i + 1} of ${windows.length}: ${w.frames} frames, ${w.new_frames} new, seed ${w.seed}`;
    return div;
  }));
  const overlap = [...form.querySelectorAll(".ext-mult")];
  if (windows.length > 1 && overlap.every((el) => el.value.trim() === "")) {
    state.extensionDefaults = [...windows[1].conditioning].sort((a, b) => a.latent_index - b.latent_index)
      .map((c) => c.multiplier);
    overlap.forEach((el, i) => { el.placeholder = `${state.extensionDefaults[i] ?? ""}`; });
  }
}

// -- a job -----------------------------------------------------------------------------------------

function logLine(type, text) {
  const last = $("#job-log").lastElementChild;
  if (type === "queued" && last?.textContent === text) return; // the stored event, then the stream's position
  const li = document.createElement("li");
  li.dataset.type = type;
  li.textContent = text;
  $("#job-log").append(li);
}

function showStatus(status) {
  const badge = $("#job-status");
  badge.textContent = status;
  badge.dataset.status = status;
  $("#cancel").disabled = TERMINAL.has(status);
}

function windowOf(job) {
  return job.segment == null ? "" : `window ${job.segment + 1} of ${job.windows} · `;
}

function stepLine(job) {
  const parts = [`${windowOf(job)}step ${job.step} of ${job.total}`];
  if (job.eta != null) parts.push(`ETA ${job.eta.toFixed(1)} s`);
  parts.push(`retries ${job.retries}`);
  return parts.join(" · ");
}

function onEvent(job, event) {
  switch (event.type) {
    case "queued":
      if (event.requeued) logLine("queued", `queued again: resumes from step ${event.resume_step}`);
      else logLine("queued", `queued${event.position != null ? ` (position ${event.position})` : ""}`);
      showStatus("queued");
      break;
    case "encoding":
      showStatus("in_progress");
      logLine("encoding", "encoding the prompt and the inputs");
      break;
    case "step":
      Object.assign(job, { step: event.step, total: event.total, eta: event.eta_s, segment: event.segment ?? null });
      if (event.segment != null) job.windows = Math.max(1, Math.round(event.total / (job.steps || event.total)));
      $("#job-progress").value = Math.round((100 * event.step) / event.total);
      $("#job-step").textContent = stepLine(job);
      logLine("step", `${windowOf(job)}step ${event.step} of ${event.total} (${event.elapsed_s} s)`);
      showStatus("in_progress");
      break;
    case "retry":
      job.retries += 1;
      $("#job-step").textContent = stepLine(job);
      logLine("retry", `retry ${event.attempt} of ${event.stage}${event.step ? ` at step ${event.step}` : ""}: ${event.reason}`);
      break;
    case "released":
      logLine("released", `handed to another runner${event.step != null ? ` after step ${event.step}` : ""}`);
      break;
    case "segment":
      job.windows = event.segments;
      logLine("segment", `window ${event.segment + 1} of ${event.segments} done: ${event.frames} frames`);
      showWindow(job, event);
      break;
    case "decoding":
      logLine("decoding", job.windows > 1 ? "joining the windows" : "decoding the video");
      break;
    case "completed":
      logLine("completed", "completed");
      break;
    case "failed":
      logLine("failed", `failed: ${event.error?.message ?? ""}`);
      break;
    case "cancelled":
      logLine("cancelled", `cancelled after step ${event.step ?? 0}`);
      break;
    default:
      logLine(event.type, event.type);
  }
}

/** A finished window of a long video: a player and a link of its MP4 (fetched with the key). */
async function showWindow(job, event) {
  const li = document.createElement("li");
  li.dataset.segment = String(event.segment);
  const title = document.createElement("span");
  title.textContent = `window ${event.segment + 1} of ${event.segments} · ${event.frames} frames`;
  li.append(title);
  $("#job-windows").append(li);
  try {
    const url = await blobUrl(`v1/videos/${job.id}/content?segment=${event.segment}`, job.abort.signal);
    if (state.job !== job) return URL.revokeObjectURL(url);
    state.windowUrls.push(url);
    const player = document.createElement("video");
    Object.assign(player, { src: url, controls: true, muted: true, loop: true, playsInline: true });
    const link = document.createElement("a");
    link.href = url;
    link.download = `${job.id}-window-${event.segment}.mp4`;
    link.textContent = "MP4";
    li.append(player, link);
  } catch (error) {
    if (!job.abort.signal.aborted) showError(error, $('[data-param="extend"]'));
  }
}

/** Show the job and follow its events until it ends, resuming a dropped stream from Last-Event-ID. */
async function follow(video) {
  state.job?.abort.abort();
  const job = (state.job = { id: video.id, abort: new AbortController(), lastEventId: null, retries: 0,
                             step: 0, total: (video.pusa?.steps ?? 0) * (video.pusa?.windows ?? 1), steps: video.pusa?.steps, eta: null,
                             segment: null, windows: video.pusa?.windows ?? null });
  $("#job").hidden = false;
  $("#result").hidden = true;
  $("#job-id").textContent = video.id;
  $("#job-log").replaceChildren();
  $("#job-windows").replaceChildren();
  for (const url of state.windowUrls) URL.revokeObjectURL(url);
  state.windowUrls = [];
  $("#job-progress").value = video.progress ?? 0;
  $("#job-step").textContent = job.total ? `step 0 of ${job.total}` : "";
  clearErrors($("#job"));
  showStatus(video.status);
  if (TERMINAL.has(video.status)) return finish(job);
  while (!job.abort.signal.aborted) {
    try {
      for await (const frame of eventStream(`v1/videos/${video.id}/events`, job.lastEventId, job.abort.signal)) {
        if (frame.id != null) job.lastEventId = frame.id;
        onEvent(job, frame.data);
        if (TERMINAL.has(frame.data.type)) return finish(job);
      }
      return finish(job); // the stream ended: the job ended earlier, or was deleted
    } catch (error) {
      if (job.abort.signal.aborted) return;
      if (error instanceof ApiError) return showError(error, $('[data-param="extend"]'));
      logLine("reconnect", `stream dropped: resuming after event ${job.lastEventId ?? "-"}`);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

async function finish(job) {
  let video;
  try {
    video = await getJSON(`v1/videos/${job.id}`);
  } catch (error) {
    return showError(error, $('[data-param="extend"]'));
  }
  if (state.job !== job) return;
  showStatus(video.status);
  $("#job-progress").value = video.progress;
  if (video.status === "failed") logLine("error", video.error?.message ?? "failed");
  if (video.status === "completed") await showResult(video);
  loadGallery().catch(showError);
}

async function showResult(video) {
  for (const url of state.resultUrls) URL.revokeObjectURL(url);
  const [mp4, thumb] = await Promise.all([blobUrl(`v1/videos/${video.id}/content`),
                                          blobUrl(`v1/videos/${video.id}/content?variant=thumbnail`)]);
  state.resultUrls = [mp4, thumb];
  const player = $("#result-video");
  player.poster = thumb;
  player.src = mp4;
  $("#result-thumb").src = thumb;
  const link = $("#download");
  link.href = mp4;
  link.download = `${video.id}.mp4`;
  $("#result").hidden = false;
  $("#result").dataset.video = video.id;
  $("#result").dataset.model = video.model;
  player.play().catch(() => {}); // muted: allowed without a gesture
}

async function cancelJob() {
  if (!state.job) return;
  try {
    const video = await getJSON(`v1/videos/${state.job.id}/cancel`, { method: "POST" });
    logLine("cancel", "cancel requested");
    showStatus(video.status);
  } catch (error) {
    showError(error, $('[data-param="extend"]'));
  }
}

/** POST /v1/videos/extensions: continue the shown video with the form's fields that every tab has. */
async function extendJob() {
  const source = $("#result").dataset.video;
  const box = $('[data-param="extend"]');
  clearErrors(box);
  clearErrors(form);
  const body = new FormData();
  body.append("video", source);
  body.append("prompt", $("#extend-prompt").value.trim() || form.elements.prompt.value.trim());
  const model = $("#result").dataset.model; // the extension runs on the model of the video it continues
  const selected = state.models[form.elements.model.value] || {};
  for (const el of form.querySelectorAll("[name]")) { // the fields every tab has: sampling, size, length
    if (el.name === "prompt" || el.name === "model" || el.closest("[data-tasks]") || unset(el)) continue;
    const only = el.closest("[data-models]")?.dataset.models.split(" ");
    if (only && !only.includes(model)) continue; // another model's fields
    if (el.name.startsWith("lora_alpha") && Number(el.value) === selected[el.name]) continue; // its model's default
    body.append(el.name, el.value.trim());
  }
  appendLists(body);
  try {
    const video = await getJSON("v1/videos/extensions", { method: "POST", body });
    await follow(video);
  } catch (error) {
    showError(error, box);
  }
}

// -- the gallery -----------------------------------------------------------------------------------

async function loadGallery() {
  const g = state.gallery;
  const limit = $("#gallery-limit").value;
  const after = g.cursors.at(-1);
  const page = await getJSON(`v1/videos?limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
  for (const url of g.urls) URL.revokeObjectURL(url);
  g.urls = [];
  g.lastId = page.last_id;
  $("#gallery-older").disabled = !page.has_more;
  $("#gallery-newer").disabled = g.cursors.length === 1;
  const cards = page.data.map((video) => {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.id = video.id;
    li.dataset.status = video.status;
    const img = document.createElement("img");
    img.alt = "";
    if (video.status === "completed") {
      blobUrl(`v1/videos/${video.id}/content?variant=thumbnail`).then((url) => {
        g.urls.push(url);
        img.src = url;
      }).catch(() => {});
    }
    const text = document.createElement("div");
    const id = document.createElement("code");
    id.textContent = video.id;
    const meta = document.createElement("span");
    meta.className = "badge";
    meta.dataset.status = video.status;
    meta.textContent = video.status;
    const about = document.createElement("p");
    about.textContent = `${video.pusa?.task ?? ""} · ${video.size} · ${video.pusa?.frames} frames · ${video.prompt ?? ""}`;
    text.append(id, " ", meta, about);
    const actions = document.createElement("div");
    actions.append(button("Open", `open ${video.id}`, () => follow(video)));
    if (video.status === "completed") {
      actions.append(button("Use as v2v input", `use ${video.id} as the input video`, () => {
        $("#f-video-id").value = video.id;
        $("#f-video").value = "";
        setTask("v2v");
      }));
    }
    li.append(img, text, actions);
    return li;
  });
  $("#gallery-list").replaceChildren(...cards);
}

// -- start -----------------------------------------------------------------------------------------

/** GET /v1/models: the selector's choices, and each served model's defaults from the plan of a bare request. */
async function loadModels() {
  let served = ["pusa-v1"];
  try {
    served = (await getJSON("v1/models")).data.map((m) => m.id);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
  const select = form.elements.model;
  const current = select.value;
  select.replaceChildren(...served.map((id) => new Option(id, id)));
  select.value = served.includes(current) ? current : served[0];
  const plans = await Promise.all(served.map((model) =>
    getJSON("v1/videos/plan", { method: "POST", json: { prompt: "defaults", model } })));
  state.models = Object.fromEntries(served.map((model, i) => [model, plans[i]]));
  setModel(select.value);
}

/** The selected model's fields (`data-models`: shown for those models only) and defaults: size and frames, and its
 * LoRA alphas (a value still at the previous model's default follows the new model's). */
function setModel(model) {
  const previous = state.models[form.dataset.model];
  const plan = state.models[model];
  form.dataset.model = model;
  for (const el of form.querySelectorAll("[data-models]")) el.hidden = !el.dataset.models.split(" ").includes(model);
  if (!plan) return;
  state.defaults = { width: plan.width, height: plan.height, frames: plan.frames };
  form.elements.size.placeholder = `${plan.width}x${plan.height} (this model's default here)`;
  form.elements.frames.placeholder = `${plan.frames} (default)`;
  for (const name of ["lora_alpha", "lora_alpha_2"]) {
    const el = form.elements[name];
    const was = previous?.[name] ?? variant(state.schema[name] || {}).default;
    if (plan[name] != null && (el.value === "" || (was != null && Number(el.value) === was))) el.value = plan[name];
  }
  form.elements.guidance_2.placeholder = "the guidance when left out";
}

async function connect() {
  try {
    await loadModels();
    clearErrors($("#key-box"));
  } catch (error) {
    showError(error);
    return;
  }
  await loadLoras();
  renderMedia();
  schedulePlan();
  loadGallery().catch(showError);
}

async function start() {
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) tab.addEventListener("click", () => setTask(tab.dataset.task));
  form.addEventListener("pointerdown", () => { state.touched = true; });
  form.addEventListener("input", (event) => {
    if (event.target.closest("#job")) return; // the job panel sits in the form's last column
    state.touched = true;
    if (["frames", "seconds", "fps", "window_frames"].includes(event.target.name)) renderMedia();
    if (event.target.type !== "file") schedulePlan();
  });
  form.addEventListener("change", (event) => {
    state.touched = true;
    if (event.target.id === "f-images" && event.target.files.length) {
      addFiles([...event.target.files]);
      event.target.value = "";
    } else if (event.target.id === "f-video" || event.target.id === "f-positions_unit") {
      schedulePlan();
    } else if (event.target.id === "f-mode") {
      setFast(event.target.checked);
    } else if (event.target.id === "f-model") {
      setModel(event.target.value);
      renderMedia();
      schedulePlan();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    state.touched = true;
    const submit = $("#submit");
    submit.disabled = true;
    try {
      await refreshPlan(); // the heat map of exactly what is sent; a 400 stops here, next to its field
      const headers = {};
      const key = $("#f-idempotency").value.trim();
      if (key) headers["Idempotency-Key"] = key;
      const video = await getJSON("v1/videos", { method: "POST", body: requestBody(), headers });
      loadGallery().catch(showError);
      follow(video);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 400)) showError(error);
      else if (!document.querySelector(".field.invalid")) showError(error);
    } finally {
      submit.disabled = false;
    }
  });
  $("#heatmap").addEventListener("mousemove", (event) => {
    const cell = cellAt($("#heatmap"), event);
    $("#heatmap-tip").textContent = cell
      ? `step ${cell.step + 1}, latent frame ${cell.frame} (pixel ${pixelFrame(cell.frame)}): timestep ${cell.timestep}` : "";
  });
  $("#add-lora").addEventListener("click", () => {
    const free = state.loras.find((l) => !state.loraRows.some((row) => row.name === l.name)) || state.loras[0];
    state.loraRows.push({ name: free.name, alpha: "" });
    renderLoras();
    schedulePlan();
  });
  $("#cancel").addEventListener("click", cancelJob);
  $("#extend").addEventListener("click", extendJob);
  $("#extend-prompt").addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault(); // not the form's submit
    extendJob();
  });
  $("#gallery-older").addEventListener("click", () => {
    state.gallery.cursors.push(state.gallery.lastId);
    loadGallery().catch(showError);
  });
  $("#gallery-newer").addEventListener("click", () => {
    if (state.gallery.cursors.length > 1) state.gallery.cursors.pop();
    loadGallery().catch(showError);
  });
  $("#gallery-refresh").addEventListener("click", () => loadGallery().catch(showError));
  $("#gallery-limit").addEventListener("change", () => {
    state.gallery.cursors = [null];
    loadGallery().catch(showError);
  });
  $("#save-key").addEventListener("click", () => {
    apiKey.set($("#api-key").value.trim());
    connect();
  });

  const [health, spec] = await Promise.all([getJSON("health"), getJSON("openapi.json")]);
  applySchema(spec);
  setTask(location.hash.slice(1));
  $("#service-status").textContent = `preset ${health.preset} · ${health.auth === "keys" ? "API keys required" : "no API keys"}`;
  if (health.auth === "keys") {
    $("#key-box").hidden = false;
    $("#api-key").value = apiKey.get();
  }
  document.body.dataset.auth = health.auth;
  if (health.auth === "keys" && !apiKey.get()) {
    showError(new ApiError(401, { error: { message: "this service wants an API key", param: "api_key" } }));
  } else {
    await connect();
  }
  document.body.dataset.ready = "true";
}

start().catch((error) => {
  $("#service-status").textContent = `the service did not answer: ${error.message}`;
  console.error(error);
});
