// The service's public HTTP API from the browser: the bearer key, OpenAI-shaped errors, media as blob
// URLs (an <img> or <video> cannot send an Authorization header) and Server-Sent Events read over fetch
// (EventSource cannot send one either), resumable from Last-Event-ID.

const KEY = "pusa.apiKey";

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (value) => (value ? localStorage.setItem(KEY, value) : localStorage.removeItem(KEY)),
};

/** An error response in OpenAI's shape: `param` names the request field when there is one. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param ?? null;
    this.type = error.type ?? null;
  }
}

function headers(extra = {}) {
  const all = { ...extra };
  const key = apiKey.get();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

/** fetch `path` (relative to the page, so a deployment under a prefix works) with the key; throws ApiError. */
export async function api(path, { method = "GET", json, body, headers: extra = {}, signal } = {}) {
  const init = { method, headers: headers(extra), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, data);
  }
  return response;
}

export async function getJSON(path, options) {
  return (await api(path, options)).json();
}

/** A blob: URL of a result file, fetched with the key. */
export async function blobUrl(path, signal) {
  const response = await api(path, { signal });
  return URL.createObjectURL(await response.blob());
}

/** The events of a stream as {event, id, data} (data parsed as JSON), after `lastEventId` when given. */
export async function* eventStream(path, lastEventId, signal) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId != null) extra["Last-Event-ID"] = String(lastEventId);
  const response = await api(path, { headers: extra, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const frame = { event: "message", id: null, data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") frame.event = value;
        else if (name === "id") frame.id = value;
        else if (name === "data") frame.data.push(value);
      }
      if (frame.data.length) yield { event: frame.event, id: frame.id, data: JSON.parse(frame.data.join("\n")) };
    }
  }
}
