"""A deterministic synthetic clip with known changes: ground truth for DTD and scene-change tests.

The clip is token-aligned for Qwen2.5-VL: frames are ``cells × 28`` pixels square (one LLM token =
28×28 pixels = 2×2 patches of 14), and every temporal patch (2 consecutive frames) is identical, so
the ground truth is exact per LLM token and per temporal step. Timeline, in temporal steps
(default 24 steps = 48 frames at 2 fps = 24 s):

* steps 0–5: scene A, static, an object (a solid square) sitting at one cell;
* steps 6–11: the object moves one cell right per step (old and new cell change);
* step 12: hard cut to scene B; steps 12–15 static;
* step 16: hard cut to scene C; steps 16–19 static;
* steps 20–23: scene C fades toward black (every cell changes, uniformly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_plugin.streams.session import Geometry

TOKEN_PX = Geometry().factor  # one LLM token's cell: patch_size (14) * spatial_merge_size (2)
TEMPORAL_PATCH = Geometry().temporal_patch_size


@dataclass
class SyntheticClip:
    frames: np.ndarray  # uint8 (N, H, W, 3)
    fps: float
    changed: np.ndarray  # bool (T, cells, cells): token changed vs the previous temporal step; step 0 all True
    events: list[dict] = field(default_factory=list)  # {"step", "frame", "time", "kind"}

    @property
    def num_steps(self) -> int:
        return self.changed.shape[0]

    @property
    def cut_steps(self) -> list[int]:
        return [e["step"] for e in self.events if e["kind"] == "cut"]

    @property
    def static_steps(self) -> list[int]:
        """Steps t ≥ 1 in which nothing changed."""
        return [t for t in range(1, self.num_steps) if not self.changed[t].any()]

    def expected_kept_per_step(self) -> list[int]:
        return [int(c.sum()) for c in self.changed]


def _texture(rng: np.random.Generator, size: int, block: int = 7) -> np.ndarray:
    n = size // block
    small = rng.integers(48, 209, size=(n, n, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, block, axis=0), block, axis=1)


def make_clip(cells: int = 8, fps: float = 2.0, seed: int = 0, token_px: int = TOKEN_PX) -> SyntheticClip:
    """Build the clip described in the module docstring (``cells`` × ``cells`` tokens per frame of
    ``token_px`` pixels: 28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL)."""
    if cells < 8:
        raise ValueError("cells must be >= 8 (the object walks 6 cells)")
    if token_px % 4:
        raise ValueError(f"token_px must be a multiple of 4, got {token_px}")
    rng = np.random.default_rng(seed)
    size = cells * token_px
    scene_a, scene_b, scene_c = (_texture(rng, size, block=token_px // 4) for _ in range(3))
    obj_color = np.array([250, 20, 20], dtype=np.uint8)
    row = cells // 2
    steps = 24
    images: list[np.ndarray] = []
    changed = np.zeros((steps, cells, cells), dtype=bool)
    changed[0] = True
    events: list[dict] = []

    def cell_slice(r: int, c: int):
        return slice(r * token_px, (r + 1) * token_px), slice(c * token_px, (c + 1) * token_px)

    col = 1
    for s in range(steps):
        if s < 12:
            if s >= 6:
                changed[s][row, col] = changed[s][row, col + 1] = True
                col += 1
                if s == 6:
                    events.append({"step": s, "kind": "motion_start"})
            img = scene_a.copy()
            img[cell_slice(row, col)] = obj_color
        elif s < 16:
            img = scene_b.copy()
            if s == 12:
                changed[s] = True
                events.append({"step": s, "kind": "cut"})
        elif s < 20:
            img = scene_c.copy()
            if s == 16:
                changed[s] = True
                events.append({"step": s, "kind": "cut"})
        else:
            factor = 1.0 - 0.2 * (s - 19)  # 0.8, 0.6, 0.4, 0.2
            img = np.round(scene_c.astype(np.float64) * factor).astype(np.uint8)
            changed[s] = True
            if s == 20:
                events.append({"step": s, "kind": "fade_start"})
        images.extend([img] * TEMPORAL_PATCH)
    for e in events:
        e["frame"] = e["step"] * TEMPORAL_PATCH
        e["time"] = e["frame"] / fps
    return SyntheticClip(frames=np.stack(images), fps=fps, changed=changed, events=events)
