// flux-proxy playground: plain JS, no libraries, nothing loaded from anywhere else.
//
// The client key lives in this browser only: sessionStorage (forgotten when the tab
// closes), or localStorage when "remember" is ticked. It is sent to this proxy only,
// as `Authorization: Bearer <key>`; never in a URL. The page talks to the API on its
// own origin (CSP connect-src 'self'). Every text the API returns is put in the page
// with textContent, never as HTML.
"use strict";

(() => {
  const KEY_NAME = "flux-proxy.playground.key";
  const TERMINAL = new Set(["completed", "failed", "canceled"]);
  const OUTPUT_PATH = /^\/v1\/predictions\/[^/]+\/outputs\/\d+$/;
  const POLL_FIRST_MS = 300;
  const POLL_MAX_MS = 2000;
  const $ = (id) => document.getElementById(id);

  let key = "";
  let imageData = null; // data URI of the chosen image
  let imageSize = null; // [width, height] of it
  let maskFileData = null; // data URI of a mask file
  let providerOrder = []; // names, in the order ticked
  const running = new Map(); // prediction id -> group state

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-")) node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(typeof child === "string" ? document.createTextNode(child) : child);
      }
    }
    return node;
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("not an image this browser can read"));
      img.src = src;
    });
  }

  function ms(value) {
    if (value === undefined || value === null) return "-";
    return value >= 10000 ? `${(value / 1000).toFixed(1)} s` : `${value} ms`;
  }

  // ------------------------------------------------------------------ the key and the API

  function loadKey() {
    key = sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
    $("remember-key").checked = Boolean(localStorage.getItem(KEY_NAME));
    $("api-key").value = key;
  }

  function storeKey(value, remember) {
    key = value;
    sessionStorage.setItem(KEY_NAME, value);
    if (remember) localStorage.setItem(KEY_NAME, value);
    else localStorage.removeItem(KEY_NAME);
  }

  function forgetKey() {
    key = "";
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    $("api-key").value = "";
    $("remember-key").checked = false;
    $("key-status").textContent = "no key";
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${key}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, cache: "no-store", credentials: "omit",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      return { status: 0, data: { error: { code: "network", message: String(err) } } };
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { error: { code: "not_json", message: text.slice(0, 300) } };
    }
    return { status: response.status, data };
  }

  function errorText(result) {
    const err = (result.data && result.data.error) || {};
    return `${result.status || "no answer"} ${err.code || ""}: ${err.message || "request failed"}`;
  }

  async function connect() {
    const status = $("key-status");
    if (!key) {
      status.textContent = "no key";
      return;
    }
    status.textContent = "checking...";
    const result = await api("GET", "/v1/models");
    if (result.status !== 200) {
      status.textContent = `key refused (${errorText(result)})`;
      return;
    }
    status.textContent = "key accepted";
    fillModels(result.data.data || []);
    refreshRecent();
  }

  // ------------------------------------------------------------------ models and providers

  let models = [];

  function fillModels(list) {
    models = list;
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...list.map((m) => el("option", { value: m.id, text: m.id })));
    if (list.some((m) => m.id === chosen)) select.value = chosen;
    fillProviders();
  }

  function fillProviders() {
    const model = models.find((m) => m.id === $("model").value) || models[0];
    const box = $("providers");
    const providers = (model && model.providers) || [];
    providerOrder = providerOrder.filter((n) => providers.some((p) => p.name === n && p.enabled));
    box.replaceChildren(...providers.map((p) => {
      const input = el("input", {
        type: "checkbox", value: p.name, disabled: !p.enabled,
        checked: providerOrder.includes(p.name), "data-provider": p.name,
      });
      input.addEventListener("change", () => {
        providerOrder = providerOrder.filter((n) => n !== p.name);
        if (input.checked) providerOrder.push(p.name);
        showProviderOrder();
      });
      const label = el("label", { class: "inline", title: p.enabled ? p.kind : p.disabled_reason },
        input, el("span", { class: "order", "data-order": p.name }), p.name,
        p.enabled ? null : el("span", { class: "muted small", text: ` (${p.disabled_reason})` }));
      return label;
    }));
    showProviderOrder();
  }

  function showProviderOrder() {
    for (const span of $("providers").querySelectorAll("[data-order]")) {
      const at = providerOrder.indexOf(span.getAttribute("data-order"));
      span.textContent = at >= 0 ? String(at + 1) : "";
    }
  }

  // ------------------------------------------------------------------ image and mask

  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let painting = null;

  function maskMode() {
    return document.querySelector("input[name=mask-mode]:checked").value;
  }

  function showMaskTools() {
    const mode = maskMode();
    $("mask-file").hidden = mode !== "file";
    $("paint-tools").hidden = mode !== "paint";
    canvas.hidden = mode !== "paint" || !imageData;
    $("paint-wrap").hidden = !imageData;
  }

  function resetCanvas(fill) {
    if (!imageSize) return;
    [canvas.width, canvas.height] = imageSize; // the mask has the image's own size
    ctx.fillStyle = fill;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  async function chooseImage(file) {
    imageData = null;
    imageSize = null;
    $("image-info").textContent = "";
    if (file) {
      try {
        const uri = await readAsDataURL(file);
        const img = await loadImage(uri);
        imageData = uri;
        imageSize = [img.naturalWidth, img.naturalHeight];
        $("image-preview").src = uri;
        $("image-info").textContent = `${imageSize[0]} x ${imageSize[1]} px`;
        resetCanvas("#000");
      } catch (err) {
        $("image-info").textContent = String(err.message || err);
      }
    }
    if (!imageData) $("image-preview").removeAttribute("src");
    showMaskTools();
  }

  function canvasPoint(event) {
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
      scale: canvas.width / rect.width,
    };
  }

  function stroke(from, to) {
    ctx.strokeStyle = $("erase").checked ? "#000" : "#fff";
    ctx.fillStyle = ctx.strokeStyle;
    ctx.lineWidth = Number($("brush").value) * to.scale;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    painting = canvasPoint(event);
    stroke(painting, painting);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!painting) return;
    const point = canvasPoint(event);
    stroke(painting, point);
    painting = point;
  });
  for (const name of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(name, () => { painting = null; });
  }

  // ------------------------------------------------------------------ the request

  function numberOf(id) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined; // left empty: the proxy's default
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw; // not a number: the proxy says why
  }

  function buildRequest() {
    const req = { model: $("model").value || "flux-dev", prompt: $("prompt").value };
    const w = $("width").value.trim();
    const h = $("height").value.trim();
    req.size = `${w}*${h}`;
    for (const id of ["num_inference_steps", "guidance_scale", "num_images", "seed"]) {
      const value = numberOf(id);
      if (value !== undefined) req[id] = value;
    }
    req.output_format = $("output_format").value;
    for (const id of ["enable_safety_checker", "enable_base64_output", "enable_sync_mode"]) {
      req[id] = $(id).checked;
    }
    if (providerOrder.length) req.providers = [...providerOrder];
    if (imageData) {
      req.image = imageData;
      const strength = numberOf("strength");
      if (strength !== undefined) req.strength = strength;
      const mode = maskMode();
      if (mode === "paint") req.mask_image = canvas.toDataURL("image/png");
      else if (mode === "file" && maskFileData) req.mask_image = maskFileData;
    } else if (maskMode() === "file" && maskFileData) {
      req.mask_image = maskFileData; // without an image: the proxy's 422 explains
    }
    return req;
  }

  // ------------------------------------------------------------------ errors

  function clearErrors() {
    $("errors").hidden = true;
    $("errors").replaceChildren();
    for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
    for (const node of document.querySelectorAll(".field-error")) node.remove();
  }

  function fieldInputs(field) {
    const byData = [...document.querySelectorAll(`[data-field="${CSS.escape(field)}"]`)];
    const byName = [...document.getElementsByName(field)];
    return [...new Set([...byData, ...byName])];
  }

  function showErrors(result) {
    const box = $("errors");
    const err = (result.data && result.data.error) || {};
    const items = (err.details || []).map((d) => {
      for (const input of fieldInputs(d.field || "")) {
        input.classList.add("invalid");
        input.after(el("span", { class: "field-error", text: d.reason || "" }));
      }
      const parts = [`${d.field}: ${d.reason}`];
      if (d.value !== undefined && d.value !== null) parts.push(`value ${JSON.stringify(d.value)}`);
      if (d.allowed) parts.push(`allowed: ${d.allowed}`);
      return el("li", { "data-error-field": d.field, text: parts.join("; ") });
    });
    box.replaceChildren(el("strong", { text: errorText(result) }),
      items.length ? el("ul", {}, ...items) : null);
    box.hidden = false;
  }

  // ------------------------------------------------------------------ results

  function groupFor(pred) {
    const id = pred.id;
    $("no-results").hidden = true;
    const cancel = el("button", { type: "button", class: "cancel", text: "Cancel" });
    const node = el("section", { class: "group", "data-prediction-id": id },
      el("header", {},
        el("span", { class: "status", "data-role": "status" }),
        el("span", { class: "pid", text: id }),
        el("span", {}, "provider ", el("b", { "data-role": "provider" })),
        el("span", {}, "attempt ", el("b", { "data-role": "attempt" })),
        el("span", {}, "elapsed ", el("b", { "data-role": "elapsed" })),
        el("span", {}, "total cost $", el("b", { "data-role": "total-cost" })),
        cancel),
      el("p", { class: "error", "data-role": "error", hidden: true }),
      el("div", { class: "grid", "data-role": "grid" }));
    $("results").prepend(node);
    const group = {
      id, node, cancel, started: performance.now(), shown: 0, timer: null,
      delay: POLL_FIRST_MS, ended: false,
    };
    cancel.addEventListener("click", () => cancelPrediction(group));
    return group;
  }

  function part(group, role) {
    return group.node.querySelector(`[data-role="${role}"]`);
  }

  function render(group, pred) {
    const status = part(group, "status");
    status.textContent = pred.status;
    status.className = `status ${pred.status}`;
    group.node.setAttribute("data-status", pred.status);
    const attempts = pred.attempts || [];
    const last = attempts[attempts.length - 1];
    part(group, "provider").textContent = pred.provider || (last && last.provider) || "-";
    part(group, "attempt").textContent = attempts.length
      ? `${attempts.length} (${last.status})` : "-";
    part(group, "total-cost").textContent = pred.cost_usd;
    const terminal = TERMINAL.has(pred.status);
    group.cancel.hidden = terminal;
    if (terminal) {
      const total = pred.timings && pred.timings.total_ms;
      part(group, "elapsed").textContent = total !== undefined ? ms(total)
        : ms(Math.round(performance.now() - group.started));
    }
    const error = part(group, "error");
    error.hidden = !pred.error;
    error.textContent = pred.error ? `${pred.error_kind || "error"}: ${pred.error}` : "";
    const outputs = pred.outputs || [];
    for (let i = group.shown; i < outputs.length; i++) {
      part(group, "grid").append(card(pred, i));
    }
    group.shown = Math.max(group.shown, outputs.length);
  }

  function card(pred, index) {
    const timings = pred.timings || {};
    const nsfw = (pred.has_nsfw_contents || [])[index] === true;
    const img = el("img", { alt: `output ${index} of ${pred.id}` });
    showOutput(img, pred.outputs[index]);
    const latency = timings.upstream_ms !== undefined
      ? `${ms(timings.total_ms)} (upstream ${ms(timings.upstream_ms)})` : ms(timings.total_ms);
    const rows = [
      ["provider", pred.provider || "-", "provider"],
      ["seed", String(pred.seed), "seed"],
      ["cost", `$${pred.cost_usd}${pred.outputs.length > 1 ? ` (all ${pred.outputs.length})` : ""}`, "cost"],
      ["latency", latency, "latency"],
    ];
    const dl = el("dl", {});
    for (const [name, value, role] of rows) {
      dl.append(el("dt", { text: name }), el("dd", { "data-role": role, text: value }));
    }
    return el("figure", { class: "card", "data-index": String(index), "data-nsfw": String(nsfw) },
      nsfw ? el("span", { class: "badge", text: "NSFW" }) : null,
      img, el("figcaption", {}, dl));
  }

  async function showOutput(img, url) {
    if (url.startsWith("data:")) {
      img.src = url;
      return;
    }
    let parsed;
    try {
      parsed = new URL(url, location.href);
    } catch {
      img.alt = `not a URL: ${url}`;
      return;
    }
    if (!OUTPUT_PATH.test(parsed.pathname)) {
      img.src = url; // the provider's own URL: shown as it is (no key goes with it)
      return;
    }
    // An output this proxy keeps: it needs the key, so fetch it (from this same proxy,
    // whatever public_base_url names) and show the bytes as a blob: URL.
    const response = await fetch(parsed.pathname, {
      headers: { Authorization: `Bearer ${key}` }, cache: "no-store", credentials: "omit",
    }).catch((err) => ({ ok: false, status: String(err) }));
    if (!response.ok) {
      img.alt = `output not available (${response.status})`;
      return;
    }
    img.src = URL.createObjectURL(await response.blob());
  }

  function track(group, pred) {
    if (group.ended) return; // a poll answered after the end (a cancel's answer came first)
    clearTimeout(group.timer); // one poll pending at a time (a cancel's answer lands here too)
    render(group, pred);
    if (TERMINAL.has(pred.status)) {
      group.ended = true;
      running.delete(group.id);
      refreshRecent();
      return;
    }
    running.set(group.id, group);
    group.timer = setTimeout(() => poll(group), group.delay);
    group.delay = Math.min(POLL_MAX_MS, Math.round(group.delay * 1.5));
  }

  async function poll(group) {
    const result = await api("GET", `/v1/predictions/${encodeURIComponent(group.id)}`);
    if (result.status !== 200) {
      const error = part(group, "error");
      error.hidden = false;
      error.textContent = `polling: ${errorText(result)} (retrying)`;
      group.timer = setTimeout(() => poll(group), POLL_MAX_MS);
      return;
    }
    track(group, result.data);
  }

  async function cancelPrediction(group) {
    group.cancel.disabled = true;
    const result = await api("POST", `/v1/predictions/${encodeURIComponent(group.id)}/cancel`);
    group.cancel.disabled = false;
    if (result.status === 200) {
      clearTimeout(group.timer);
      track(group, result.data);
    } else if (result.status !== 409) { // 409: it had already ended; the next poll shows how
      const error = part(group, "error");
      error.hidden = false;
      error.textContent = `cancel: ${errorText(result)}`;
    }
  }

  setInterval(() => {
    for (const group of running.values()) {
      part(group, "elapsed").textContent = ms(Math.round(performance.now() - group.started));
    }
  }, 200);

  async function generate(event) {
    event.preventDefault();
    clearErrors();
    if (!key) {
      showErrors({ status: 0, data: { error: { code: "no_key", message: "enter a client key first" } } });
      return;
    }
    const button = $("generate");
    button.disabled = true;
    $("form-status").textContent = $("enable_sync_mode").checked ? "waiting (sync mode)..." : "submitting...";
    const result = await api("POST", "/v1/predictions", buildRequest());
    button.disabled = false;
    $("form-status").textContent = "";
    if (result.status !== 200 && result.status !== 202) {
      showErrors(result);
      return;
    }
    track(groupFor(result.data), result.data);
  }

  // ------------------------------------------------------------------ recent predictions

  async function refreshRecent() {
    if (!key) return;
    const status = $("recent-status");
    const result = await api("GET", "/v1/predictions?limit=20");
    if (result.status !== 200) {
      status.textContent = errorText(result);
      return;
    }
    const rows = (result.data.data || []).map((p) => {
      const show = el("button", { type: "button", text: "show" });
      show.addEventListener("click", () => {
        if (!running.has(p.id)) track(groupFor(p), p);
      });
      return el("tr", { "data-prediction-id": p.id, "data-status": p.status },
        el("td", { text: String(p.created_at).replace("T", " ").slice(0, 19) }),
        el("td", { class: "mono", text: p.id }),
        el("td", {}, el("span", { class: `status ${p.status}`, text: p.status })),
        el("td", { text: p.provider || "-" }),
        el("td", { class: "num", text: String((p.outputs || []).length) }),
        el("td", { class: "num", "data-role": "cost", text: p.cost_usd }),
        el("td", { text: p.error_kind || "" }),
        el("td", {}, show));
    });
    $("recent-body").replaceChildren(...rows);
    status.textContent = `${rows.length} shown, as of ${new Date().toLocaleTimeString()}`;
  }

  // ------------------------------------------------------------------ wiring

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim(), $("remember-key").checked);
    connect();
  });
  $("key-forget").addEventListener("click", forgetKey);
  $("gen-form").addEventListener("submit", generate);
  $("model").addEventListener("change", fillProviders);
  $("recent-refresh").addEventListener("click", refreshRecent);
  $("seed-random").addEventListener("click", () => { $("seed").value = "-1"; });
  $("size-preset").addEventListener("change", () => {
    const value = $("size-preset").value;
    if (value === "custom") return;
    [$("width").value, $("height").value] = value.split("*");
  });
  for (const id of ["width", "height"]) {
    $(id).addEventListener("input", () => {
      const size = `${$("width").value}*${$("height").value}`;
      const known = [...$("size-preset").options].some((o) => o.value === size);
      $("size-preset").value = known ? size : "custom";
    });
  }
  $("image-file").addEventListener("change", () => chooseImage($("image-file").files[0]));
  $("image-clear").addEventListener("click", () => {
    $("image-file").value = "";
    chooseImage(null);
  });
  $("mask-file").addEventListener("change", async () => {
    const file = $("mask-file").files[0];
    maskFileData = file ? await readAsDataURL(file) : null;
  });
  for (const radio of document.querySelectorAll("input[name=mask-mode]")) {
    radio.addEventListener("change", showMaskTools);
  }
  $("mask-clear").addEventListener("click", () => resetCanvas("#000"));
  $("mask-all").addEventListener("click", () => resetCanvas("#fff"));

  loadKey();
  showMaskTools();
  connect();
})();
