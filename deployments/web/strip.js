// The latent frames of the video as a strip of cells. Items (an image, or a conditioned frame of the input
// video) sit in cells: click a cell to place the selected item there, drag an item to move it (pointer
// events, so mouse, pen and touch work alike). Each cell shows its pixel-frame equivalent: latent frame 0
// is pixel frame 0, latent frame k >= 1 covers pixel frames 4k-3..4k (pusa_model.request maps a pixel
// position p to latent (p + 3) // 4, so 4k is the pixel position sent for latent k).

export const pixelFrame = (latent) => 4 * latent;

export class Strip {
  /** `handlers`: onPlace(cell) for a click on a cell, onMove(key, cell) for a drop, onSelect(key). */
  constructor(root, handlers) {
    this.root = root;
    this.handlers = handlers;
    this.frames = 0;
    this.items = [];
    this.selected = null;
    this.ghosts = new Map();
    this.drag = null;
    root.addEventListener("pointerdown", (e) => this.down(e));
    root.addEventListener("pointermove", (e) => this.move(e));
    root.addEventListener("pointerup", (e) => this.up(e));
    root.addEventListener("pointercancel", () => this.end());
  }

  /** `items`: [{key, position, label, thumb}]; `ghosts`: latent index -> multiplier the plan conditions. */
  render(frames, items, selected, ghosts = new Map()) {
    Object.assign(this, { frames, items, selected, ghosts });
    const cells = [];
    for (let i = 0; i < frames; i++) {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.dataset.latent = String(i);
      cell.title = i === 0 ? "latent frame 0 = pixel frame 0" : `latent frame ${i} = pixel frames ${4 * i - 3}-${4 * i}`;
      if (ghosts.has(i)) {
        cell.classList.add("conditioned");
        cell.dataset.multiplier = String(ghosts.get(i));
      }
      const head = document.createElement("span");
      head.className = "latent";
      head.textContent = String(i);
      const pixel = document.createElement("span");
      pixel.className = "pixel";
      pixel.textContent = `px ${pixelFrame(i)}`;
      cell.append(head, pixel);
      for (const item of items.filter((it) => it.position === i)) {
        const chip = document.createElement("div");
        chip.className = "chip" + (item.key === selected ? " selected" : "");
        chip.dataset.key = item.key;
        if (item.thumb) {
          const img = document.createElement("img");
          img.src = item.thumb;
          img.alt = item.label;
          img.draggable = false;
          chip.append(img);
        }
        const label = document.createElement("span");
        label.textContent = item.label;
        chip.append(label);
        cell.append(chip);
      }
      if (ghosts.has(i)) {
        const m = document.createElement("span");
        m.className = "mult";
        m.textContent = `×${ghosts.get(i)}`;
        cell.append(m);
      }
      cells.push(cell);
    }
    this.root.replaceChildren(...cells);
  }

  cellAt(x, y) {
    const cell = document.elementFromPoint(x, y)?.closest?.(".cell");
    return cell && this.root.contains(cell) ? Number(cell.dataset.latent) : null;
  }

  down(event) {
    if (event.button !== 0) return;
    const chip = event.target.closest(".chip");
    this.drag = { key: chip?.dataset.key ?? null, x: event.clientX, y: event.clientY, moved: false,
                  from: this.cellAt(event.clientX, event.clientY) };
    this.root.setPointerCapture(event.pointerId);
    event.preventDefault();
  }

  move(event) {
    if (!this.drag || this.drag.key == null) return;
    if (Math.hypot(event.clientX - this.drag.x, event.clientY - this.drag.y) > 4) this.drag.moved = true;
    const over = this.cellAt(event.clientX, event.clientY);
    for (const cell of this.root.children) cell.classList.toggle("drop", Number(cell.dataset.latent) === over && this.drag.moved);
  }

  up(event) {
    const drag = this.drag;
    this.end();
    if (!drag) return;
    const cell = this.cellAt(event.clientX, event.clientY);
    if (drag.key != null && drag.moved) {
      if (cell != null && cell !== drag.from) this.handlers.onMove(drag.key, cell);
    } else if (drag.key != null) {
      this.handlers.onSelect(drag.key);
    } else if (cell != null) {
      this.handlers.onPlace(cell);
    }
  }

  end() {
    this.drag = null;
    for (const cell of this.root.children) cell.classList.remove("drop");
  }
}
