// A plan's per-frame timesteps as a heat map: one row per step, one column per latent frame, dark where
// a frame is (nearly) clean and bright where it is noise. A noise multiplier below 1 darkens its column.

const MAX_TIMESTEP = 1000;
// matplotlib's "plasma", five stops
const STOPS = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]];

export function color(value) {
  const t = Math.min(1, Math.max(0, value / MAX_TIMESTEP)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(t));
  const f = t - i;
  const [a, b] = [STOPS[i], STOPS[i + 1]];
  return `rgb(${a.map((c, k) => Math.round(c + (b[k] - c) * f)).join(",")})`;
}

const MARGIN = { left: 52, top: 24, right: 12, bottom: 52 };

/** Draw `plan` (the body of POST /v1/videos/plan) on `canvas`; `highlight` outlines a step's row. */
export function drawHeatmap(canvas, plan, highlight = null) {
  const rows = plan.steps.map((s) => s.timesteps);
  const steps = rows.length;
  const frames = plan.latent_frames;
  const cw = Math.max(12, Math.min(48, Math.floor(480 / frames)));
  const ch = Math.max(6, Math.min(26, Math.floor(260 / steps)));
  canvas.width = MARGIN.left + frames * cw + MARGIN.right;
  canvas.height = MARGIN.top + steps * ch + MARGIN.bottom;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let k = 0; k < steps; k++) {
    for (let f = 0; f < frames; f++) {
      ctx.fillStyle = color(rows[k][f]);
      ctx.fillRect(MARGIN.left + f * cw, MARGIN.top + k * ch, cw - 1, ch - 1);
    }
  }
  ctx.fillStyle = "#333";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  const every = Math.ceil(frames / 16);
  const conditioned = new Set(plan.conditioning.map((c) => c.latent_index));
  for (let f = 0; f < frames; f += every) {
    ctx.font = conditioned.has(f) ? "bold 11px system-ui, sans-serif" : "11px system-ui, sans-serif";
    ctx.fillText(String(f), MARGIN.left + f * cw + cw / 2, MARGIN.top - 8);
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  const rowEvery = Math.ceil(steps / 12);
  for (let k = 0; k < steps; k += rowEvery) ctx.fillText(String(k + 1), MARGIN.left - 6, MARGIN.top + k * ch + ch / 2 + 4);
  ctx.save();
  ctx.translate(12, MARGIN.top + (steps * ch) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("step", 0, 0);
  ctx.restore();
  ctx.textAlign = "center";
  const bottom = MARGIN.top + steps * ch;
  ctx.fillText("latent frame (bold: conditioned)", MARGIN.left + (frames * cw) / 2, bottom + 16);
  // legend: timestep 0 .. 1000
  const width = Math.min(200, frames * cw);
  for (let x = 0; x < width; x++) {
    ctx.fillStyle = color((x / (width - 1)) * MAX_TIMESTEP);
    ctx.fillRect(MARGIN.left + x, bottom + 26, 1, 10);
  }
  ctx.fillStyle = "#333";
  ctx.textAlign = "left";
  ctx.fillText("timestep 0", MARGIN.left, bottom + 48);
  ctx.textAlign = "right";
  ctx.fillText(String(MAX_TIMESTEP), MARGIN.left + width, bottom + 48);
  if (highlight != null && highlight >= 0 && highlight < steps) {
    ctx.strokeStyle = "#0a84ff";
    ctx.lineWidth = 2;
    ctx.strokeRect(MARGIN.left - 1, MARGIN.top + highlight * ch - 1, frames * cw + 1, ch + 1);
  }
  canvas.dataset.steps = String(steps);
  canvas.dataset.latentFrames = String(frames);
  canvas.dataset.timesteps = JSON.stringify(rows);
  canvas._geometry = { cw, ch, frames, steps, rows };
}

/** The cell under a mouse position: {step, frame, timestep}, or null. */
export function cellAt(canvas, event) {
  const g = canvas._geometry;
  if (!g) return null;
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width - MARGIN.left;
  const y = ((event.clientY - box.top) * canvas.height) / box.height - MARGIN.top;
  const frame = Math.floor(x / g.cw);
  const step = Math.floor(y / g.ch);
  if (x < 0 || y < 0 || frame >= g.frames || step >= g.steps) return null;
  return { step, frame, timestep: g.rows[step][frame] };
}

/** The pixel (centre) of a cell, in canvas coordinates: for tests and tooltips. */
export function cellCentre(canvas, step, frame) {
  const g = canvas._geometry;
  return [MARGIN.left + frame * g.cw + g.cw / 2, MARGIN.top + step * g.ch + g.ch / 2];
}
