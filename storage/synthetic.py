"""Synthetic drives: procedurally rendered street scenes with exact labels and exact optical flow.

A camera drives forward down a four-lane street (with a slight lateral sway). The scene holds a
textured road with lane markings, pavements, building facades of varying height, fences with
thin slats, trees, poles with signs, parked / same-direction / oncoming cars (boxes), crossing
and walking pedestrians and bicyclists (upright billboards), all placed from a seed. Everything is
ray-cast per pixel, so:

* labels are exact (the class of the nearest surface at each pixel centre);
* flow is exact: the hit point of every pixel is moved by its object's motion and the camera's
  motion and projected again (forward: t -> t+1 on frame t's pixels; backward: t+1 -> t on
  frame t+1's pixels), occluded or not, as in Sintel's flow;
* textures are functions of the surface point, so brightness constancy holds along the flow.

Coordinates: world x right, y up, z forward; pixel (row i, col j) sits at image coordinates
(x=j, y=i); flow channel 0 is the x (column) displacement, channel 1 the y (row) displacement.

The classes are CamVid's 11 (so a teacher trained on CamVid transfers); a caller may choose a
subset, and objects of classes not chosen are simply not placed (``Sky`` and ``Road`` are always
needed).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from autolabel.errors import RenderError
from autolabel.runtime import compute_threads
from autolabel.workers import HoldsWorkerPool, WorkerPool

from autolabel.errors import ConfigError
from autolabel.storage.classes import CAMVID11, ClassSet

SYNTHETIC_CLASSES: list[str] = list(CAMVID11.names)

ROAD_HALF = 7.0          # four 3.5 m lanes
PAVEMENT = 3.0           # pavement width on each side
FACADE = ROAD_HALF + PAVEMENT
CAMERA_HEIGHT = 1.5
EGO_LANE_X = 1.75
_NEAR = 0.05             # nearest visible depth (m)


class SyntheticConfig(BaseModel):
    """One synthetic drive: its size, length, class set, motion and seed."""

    model_config = ConfigDict(frozen=True)

    width: int = Field(320, ge=16, le=4096)
    height: int = Field(240, ge=16, le=4096)
    frames: int = Field(30, ge=1, le=100_000)
    seed: int = 0
    fps: float = Field(15.0, gt=0)
    classes: list[str] = Field(default_factory=lambda: list(SYNTHETIC_CLASSES))
    ego_speed: tuple[float, float] = Field((5.0, 9.0), description="m/s range the ego speed is drawn from")
    cars: int = Field(8, ge=0)
    pedestrians: int = Field(4, ge=0)
    bicyclists: int = Field(2, ge=0)
    noise_std: float = Field(0.0, ge=0, description="Gaussian pixel noise (grey levels)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        unknown = [c for c in self.classes if c not in SYNTHETIC_CLASSES]
        if unknown:
            raise ConfigError(f"unknown synthetic classes {unknown}; choose from {SYNTHETIC_CLASSES}")
        for needed in ("Sky", "Road"):
            if needed not in self.classes:
                raise ConfigError(f"synthetic drives always need class {needed!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"synthetic classes repeat: {self.classes}")
        return self

    def class_set(self) -> ClassSet:
        palette = dict(zip(CAMVID11.names, CAMVID11.palette))
        return ClassSet(names=list(self.classes), palette=[palette[c] for c in self.classes])


# --- procedural texture ---------------------------------------------------------------------------


def _hash2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) values from integer lattice coordinates (a stateless integer hash)."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + seed * 1442695041) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float32) / 65536.0


def value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1) at real coordinates (lattice spacing 1), same shape as ``x``."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash2(x0, y0, seed), _hash2(x0 + 1, y0, seed)
    c, d = _hash2(x0, y0 + 1, seed), _hash2(x0 + 1, y0 + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _fbm(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    return 0.6 * value_noise(x, y, seed) + 0.4 * value_noise(2.3 * x, 2.3 * y, seed + 7)


# --- scene objects --------------------------------------------------------------------------------


@dataclass
class Box:
    """An axis-aligned box (a car) moving with constant velocity along x/z."""

    x: float
    z: float
    width: float
    height: float
    length: float
    vx: float
    vz: float
    colour: tuple[float, float, float]
    cls: str = "Car"


@dataclass
class Billboard:
    """An upright shape on the plane z = const facing the camera, moving with constant velocity."""

    x: float
    z: float
    kind: str  # tree | pole | pedestrian | bicyclist
    vx: float = 0.0
    vz: float = 0.0
    colour: tuple[float, float, float] = (128.0, 128.0, 128.0)
    sign: bool = False
    scale: float = 1.0


@dataclass
class Scene:
    """Everything placed for one drive (world units: metres, seconds)."""

    ego_speed: float
    sway: float
    sway_period: float
    block_edges: np.ndarray          # (N+1,) z boundaries of facade blocks (both sides)
    block_heights: np.ndarray        # (2, N) heights, 0 = gap; row 0 left, row 1 right
    block_colours: np.ndarray        # (2, N, 3)
    fence_edges: np.ndarray          # (M+1,) z boundaries of fence segments
    fence_on: np.ndarray             # (2, M) bool
    boxes: list[Box] = field(default_factory=list)
    billboards: list[Billboard] = field(default_factory=list)


def _build_scene(cfg: SyntheticConfig) -> Scene:
    rng = np.random.default_rng(cfg.seed)
    classes = set(cfg.classes)
    speed = float(rng.uniform(*cfg.ego_speed))
    duration = cfg.frames / cfg.fps
    z_min, z_max = -40.0, speed * duration + 160.0
    t_mid = duration / 2
    cam_mid = speed * t_mid

    edges = [z_min]
    while edges[-1] < z_max:
        edges.append(edges[-1] + float(rng.uniform(8, 22)))
    n = len(edges) - 1
    heights = rng.uniform(6, 22, size=(2, n))
    heights[rng.random((2, n)) < 0.15] = 0.0  # gaps between buildings
    if "Building" not in classes:
        heights[:] = 0.0
    colours = rng.uniform(70, 200, size=(2, n, 3)) * np.array([1.0, 0.92, 0.85])

    fence_edges = [z_min]
    while fence_edges[-1] < z_max:
        fence_edges.append(fence_edges[-1] + float(rng.uniform(10, 30)))
    fence_on = rng.random((2, len(fence_edges) - 1)) < (0.45 if "Fence" in classes else 0.0)

    scene = Scene(speed, float(rng.uniform(0.05, 0.3)), float(rng.uniform(4, 9)), np.asarray(edges),
                  heights, colours, np.asarray(fence_edges), fence_on)

    for side in (-1, 1):
        if "Tree" in classes:
            z = z_min + float(rng.uniform(0, 12))
            while z < z_max:
                scene.billboards.append(Billboard(side * (ROAD_HALF + 1.6), z, "tree",
                                                  scale=float(rng.uniform(0.8, 1.3))))
                z += float(rng.uniform(9, 20))
        if "Pole" in classes:
            z = z_min + float(rng.uniform(0, 25))
            while z < z_max:
                scene.billboards.append(Billboard(side * (ROAD_HALF + 0.5), z, "pole",
                                                  sign="SignSymbol" in classes and rng.random() < 0.4))
                z += float(rng.uniform(18, 35))

    if "Car" in classes:
        for _ in range(cfg.cars):
            kind = rng.choice(["parked", "lead", "same", "oncoming"], p=[0.3, 0.1, 0.3, 0.3])
            ahead = float(rng.uniform(10, 70))
            if kind == "parked":
                x, vz = float(rng.choice([-1, 1])) * (ROAD_HALF - 1.1), 0.0
            elif kind == "lead":
                x, vz, ahead = EGO_LANE_X, speed + float(rng.uniform(-0.4, 0.4)), float(rng.uniform(12, 30))
            elif kind == "same":
                x, vz = 5.25, speed + float(rng.uniform(-5, 4))
            else:
                x, vz = float(rng.choice([-1.75, -5.25])), -float(rng.uniform(6, 12))
            z0 = cam_mid + ahead - vz * t_mid
            colour = tuple(float(c) for c in rng.uniform(20, 230, size=3))
            scene.boxes.append(Box(x, z0, 1.8, 1.5, 4.3, 0.0, vz, colour))

    if "Pedestrian" in classes:
        for _ in range(cfg.pedestrians):
            colour = tuple(float(c) for c in rng.uniform(30, 230, size=3))
            if rng.random() < 0.5:  # crossing the street, on the road around mid-drive
                vx = float(rng.choice([-1, 1])) * float(rng.uniform(1.1, 1.7))
                z = cam_mid + float(rng.uniform(12, 40))
                x0 = -vx * t_mid + float(rng.uniform(-3, 3))
                scene.billboards.append(Billboard(x0, z, "pedestrian", vx=vx, colour=colour))
            else:  # walking along a pavement
                vz = float(rng.choice([-1, 1])) * float(rng.uniform(1.0, 1.6))
                z = cam_mid + float(rng.uniform(5, 50)) - vz * t_mid
                x = float(rng.choice([-1, 1])) * (ROAD_HALF + float(rng.uniform(0.8, 2.4)))
                scene.billboards.append(Billboard(x, z, "pedestrian", vz=vz, colour=colour))

    if "Bicyclist" in classes:
        for _ in range(cfg.bicyclists):
            vz = float(rng.uniform(3, 6))
            z = cam_mid + float(rng.uniform(8, 40)) - vz * t_mid
            colour = tuple(float(c) for c in rng.uniform(30, 230, size=3))
            scene.billboards.append(Billboard(ROAD_HALF - 0.7, z, "bicyclist", vz=vz, colour=colour))
    return scene


# --- rendering ------------------------------------------------------------------------------------


@dataclass
class RenderedFrame:
    """One rendered frame.

    Attributes:
        rgb: uint8 (H, W, 3).
        label: uint8 (H, W) class indices of the drive's class set.
        flow_next: float32 (2, H, W) flow t -> t+1 on this frame's pixels.
        flow_prev: float32 (2, H, W) flow t -> t-1 on this frame's pixels
            (i.e. the backward flow of the pair (t-1, t)).
    """

    rgb: np.ndarray
    label: np.ndarray
    flow_next: np.ndarray
    flow_prev: np.ndarray


class SyntheticDrive:
    """A seeded drive that renders any frame on demand (nothing is kept between frames)."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.classes = config.class_set()
        self.scene = _build_scene(config)
        self._class_index = {name: i for i, name in enumerate(config.classes)}
        w, h = config.width, config.height
        self.focal = 0.85 * w
        self.cx, self.cy = (w - 1) / 2.0, 0.42 * (h - 1)
        jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        self.pix = np.stack([jj, ii])
        self.dx = (jj - self.cx) / self.focal
        self.dy = -(ii - self.cy) / self.focal

    def __len__(self) -> int:
        return self.config.frames

    def camera(self, t: float) -> np.ndarray:
        """Camera centre (3,) in world coordinates at frame ``t``."""
        s = self.scene
        time = t / self.config.fps
        return np.array([EGO_LANE_X + s.sway * np.sin(2 * np.pi * time / s.sway_period),
                         CAMERA_HEIGHT, s.ego_speed * time])

    def _cls(self, name: str) -> int:
        return self._class_index[name]

    def render(self, t: int) -> RenderedFrame:
        """Render frame ``t`` with its exact forward and backward flow."""
        cfg = self.config
        h, w = cfg.height, cfg.width
        cam = self.camera(t)
        time = t / cfg.fps
        dt = 1.0 / cfg.fps
        canvas = _Canvas(h, w, self._sky(), self._cls("Sky"))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self._ground(cam, canvas)
            self._facades(cam, canvas)
            for bb in self.scene.billboards:
                self._billboard(bb, cam, time, canvas)
            for box in self.scene.boxes:
                self._box(box, cam, time, canvas)
        rgb = canvas.rgb
        if cfg.noise_std > 0:
            rgb = rgb + np.random.default_rng((cfg.seed, t)).normal(0, cfg.noise_std, rgb.shape)
        frame = np.clip(rgb, 0, 255).round().astype(np.uint8)
        finite = np.isfinite(canvas.depth)
        depth = np.where(finite, canvas.depth, 1.0)
        rel = np.stack([self.dx * depth, self.dy * depth, depth], axis=-1)  # camera-relative points
        flow_next = self._flow(rel, finite, canvas.vel * dt, self.camera(t + 1) - cam)
        flow_prev = self._flow(rel, finite, -canvas.vel * dt, self.camera(t - 1) - cam)
        return RenderedFrame(frame, canvas.label, flow_next, flow_prev)

    def _flow(self, rel: np.ndarray, finite: np.ndarray, obj_step: np.ndarray, cam_step: np.ndarray) -> np.ndarray:
        """Displacement of each pixel's surface point after one step, projected (2, H, W)."""
        moved = rel + obj_step - cam_step
        z = np.maximum(moved[..., 2], _NEAR)
        u = self.cx + self.focal * moved[..., 0] / z
        v = self.cy - self.focal * moved[..., 1] / z
        flow = np.stack([u, v]) - self.pix
        flow[:, ~finite] = 0.0  # sky: at infinity, unmoved by translation
        return flow.astype(np.float32)

    def _window(self, cam: np.ndarray, depth: float, x_range: tuple[float, float],
                y_range: tuple[float, float]) -> tuple[slice, slice] | None:
        """Pixel window covering world rectangle x_range x y_range on the plane at ``depth``."""
        u = [self.cx + self.focal * (x - cam[0]) / depth for x in x_range]
        v = [self.cy - self.focal * (y - cam[1]) / depth for y in y_range]
        return self._clip_window(min(u), max(u), min(v), max(v))

    def _clip_window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice] | None:
        h, w = self.config.height, self.config.width
        j0, j1 = max(int(np.floor(u0)) - 1, 0), min(int(np.ceil(u1)) + 2, w)
        i0, i1 = max(int(np.floor(v0)) - 1, 0), min(int(np.ceil(v1)) + 2, h)
        if j0 >= j1 or i0 >= i1:
            return None
        return slice(i0, i1), slice(j0, j1)

    # --- surfaces ---

    def _sky(self) -> np.ndarray:
        h, w = self.config.height, self.config.width
        elevation = np.clip(self.dy, 0, None)[..., None]
        horizon, zenith = np.array([150.0, 190.0, 235.0]), np.array([60.0, 110.0, 200.0])
        sky = horizon + (zenith - horizon) * np.clip(elevation * 2.5, 0, 1)
        clouds = value_noise(self.dx * 6, self.dy * 12, self.config.seed + 11)[..., None]
        sky = sky + np.clip(clouds - 0.55, 0, None) * 160
        return np.broadcast_to(sky, (h, w, 3)).copy()

    def _ground(self, cam: np.ndarray, canvas: _Canvas) -> None:
        rows = slice(max(int(np.floor(self.cy)), 0), self.config.height)  # below the horizon
        win = (rows, slice(None))
        dx, dy = self.dx[win], self.dy[win]
        s = -cam[1] / dy  # depth along z to the plane y = 0
        valid = dy < 0
        x = cam[0] + s * dx
        z = cam[2] + s
        seed = self.config.seed
        on_road = np.abs(x) < ROAD_HALF
        if "Pavement" not in self.config.classes:
            on_road = np.ones_like(on_road)
        asphalt = 80 + 40 * _fbm(x * 3, z * 3, seed + 1)
        road = np.repeat(asphalt[..., None], 3, axis=-1) * np.array([1.0, 1.0, 1.04])
        dash = (np.abs(x) < 0.08) & (np.mod(z, 9.0) < 3.0)
        lanes = (np.abs(np.abs(x) - 3.5) < 0.07) & (np.mod(z + 4.0, 6.0) < 2.0)
        edge = np.abs(np.abs(x) - (ROAD_HALF - 0.25)) < 0.09
        road[dash | lanes | edge] = (225.0, 225.0, 215.0)
        canvas.paint(win, valid & on_road, s, self._cls("Road"), road)
        if "Pavement" in self.config.classes:
            tiles = ((np.mod(x, 0.6) < 0.04) | (np.mod(z, 0.6) < 0.04)).astype(np.float64)
            pave = (150 + 30 * _fbm(x * 5, z * 5, seed + 2) - 40 * tiles)[..., None] * np.array([1.0, 0.95, 0.88])
            canvas.paint(win, valid & ~on_road, s, self._cls("Pavement"), pave)

    def _facades(self, cam: np.ndarray, canvas: _Canvas) -> None:
        sc = self.scene
        seed = self.config.seed
        for row, side in enumerate((-1, 1)):
            cols = slice(0, int(np.ceil(self.cx)) + 1) if side < 0 else slice(int(np.floor(self.cx)), None)
            win = (slice(None), cols)
            dx, dy = self.dx[win], self.dy[win]
            # fences stand in front of the facades, 0.3 m in from the pavement's outer edge
            if sc.fence_on[row].any():
                s = (side * (FACADE - 0.3) - cam[0]) / dx
                y, z = cam[1] + s * dy, cam[2] + s
                seg = np.clip(np.searchsorted(sc.fence_edges, z) - 1, 0, sc.fence_on.shape[1] - 1)
                slat = (np.mod(z, 0.25) < 0.09) | ((y > 0.95) & (y < 1.1))
                mask = (side * dx > 0) & (y >= 0) & (y < 1.1) & sc.fence_on[row][seg] & slat
                wood = (110 + 50 * _fbm(z * 8, y * 2, seed + 3))[..., None] * np.array([1.0, 0.78, 0.55])
                canvas.paint(win, mask, s, self._cls("Fence"), wood)
            if "Building" not in self.config.classes:
                continue
            s = (side * FACADE - cam[0]) / dx
            y, z = cam[1] + s * dy, cam[2] + s
            block = np.clip(np.searchsorted(sc.block_edges, z) - 1, 0, sc.block_heights.shape[1] - 1)
            mask = (side * dx > 0) & (y >= 0) & (y < sc.block_heights[row][block])
            zm, ym = np.mod(z, 3.0), np.mod(y, 3.2)
            windows = (zm > 0.8) & (zm < 2.2) & (ym > 1.0) & (ym < 2.4)
            texture = 0.85 + 0.3 * _fbm(z * 2, y * 2, seed + 4)[..., None]
            facade = np.where(windows[..., None], np.array([45.0, 55.0, 75.0]), sc.block_colours[row][block]) * texture
            canvas.paint(win, mask, s, self._cls("Building"), facade)

    def _billboard(self, bb: Billboard, cam: np.ndarray, time: float, canvas: _Canvas) -> None:
        depth = bb.z + bb.vz * time - cam[2]
        if depth <= _NEAR:
            return
        ox = bb.x + bb.vx * time
        half, top = {"tree": (1.8 * bb.scale, 5.5 * bb.scale), "pole": (0.5, 6.1)}.get(bb.kind, (0.3, 1.8))
        win = self._window(cam, depth, (ox - half, ox + half), (0.0, top))
        if win is None:
            return
        dx, dy = self.dx[win], self.dy[win]
        s = np.full_like(dx, depth)
        lx = cam[0] + depth * dx - ox  # local x: metres from the object's axis
        y = cam[1] + depth * dy
        seed = self.config.seed
        if bb.kind == "tree":
            k = bb.scale
            trunk = (np.abs(lx) < 0.18 * k) & (y >= 0) & (y < 2.6 * k)
            crown = (lx / (1.7 * k)) ** 2 + ((y - 3.8 * k) / (1.6 * k)) ** 2 < 1
            leaves = (35 + 60 * _fbm(lx * 4 + bb.z, y * 4, seed + 5))[..., None] * np.array([0.8, 1.9, 0.7])
            canvas.paint(win, trunk, s, self._cls("Tree"), np.array([95.0, 70.0, 45.0]))
            canvas.paint(win, crown, s, self._cls("Tree"), leaves)
        elif bb.kind == "pole":
            canvas.paint(win, (np.abs(lx) < 0.07) & (y >= 0) & (y < 6.0), s, self._cls("Pole"),
                         np.array([115.0, 115.0, 120.0]))
            if bb.sign:
                plate = (np.abs(lx) < 0.45) & (y > 2.4) & (y < 3.1)
                ring = (np.abs(lx) < 0.38) & (y > 2.47) & (y < 3.03)
                colour = np.where(ring[..., None], np.array([30.0, 70.0, 190.0]), np.array([235.0, 235.0, 235.0]))
                canvas.paint(win, plate, s, self._cls("SignSymbol"), colour)
        else:
            cls = self._cls("Pedestrian" if bb.kind == "pedestrian" else "Bicyclist")
            head = (lx / 0.12) ** 2 + ((y - 1.62) / 0.14) ** 2 < 1
            torso = (np.abs(lx) < 0.22) & (y > 0.85) & (y < 1.5)
            legs = (np.abs(np.abs(lx) - 0.09) < 0.07) & (y >= 0) & (y <= 0.85)
            body = np.where((y > 0.85)[..., None], np.asarray(bb.colour), np.array([40.0, 40.0, 60.0]))
            body = np.where(head[..., None], np.array([215.0, 175.0, 145.0]), body)
            shape = head | torso | legs
            if bb.kind == "bicyclist":
                wheel = (lx / 0.08) ** 2 + ((y - 0.35) / 0.35) ** 2 < 1
                shape = shape | wheel
                body = np.where((wheel & ~torso)[..., None], np.array([25.0, 25.0, 25.0]), body)
            canvas.paint(win, shape, s, cls, body, (bb.vx, 0.0, bb.vz))

    def _box(self, box: Box, cam: np.ndarray, time: float, canvas: _Canvas) -> None:
        cx, cz = box.x + box.vx * time, box.z + box.vz * time
        lo = np.array([cx - box.width / 2, 0.0, cz - box.length / 2]) - cam
        hi = np.array([cx + box.width / 2, box.height, cz + box.length / 2]) - cam
        if hi[2] <= _NEAR:
            return
        if lo[2] > _NEAR:  # wholly in front: its image lies inside the corners' projections
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            u = self.cx + self.focal * corners[:, 0] / corners[:, 2]
            v = self.cy - self.focal * corners[:, 1] / corners[:, 2]
            win = self._clip_window(u.min(), u.max(), v.min(), v.max())
        else:
            win = (slice(None), slice(None))
        if win is None:
            return
        dx, dy = self.dx[win], self.dy[win]
        d = (dx, dy, np.ones_like(dx))
        t_near = np.full_like(dx, -np.inf)
        t_far = np.full_like(dx, np.inf)
        for axis in range(3):
            t1, t2 = lo[axis] / d[axis], hi[axis] / d[axis]
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        hit = (t_near <= t_far) & (t_near > _NEAR)
        s = np.where(hit, t_near, np.inf)  # d_z = 1, so the ray parameter is the depth
        s_safe = np.where(hit, s, 0.0)
        px, py, pz = cam[0] + s_safe * dx - cx, cam[1] + s_safe * dy, cam[2] + s_safe - cz
        glass = (py > 0.95) & (py < 1.4) & ((np.abs(px) < box.width / 2 - 0.12) | (np.abs(pz) < box.length / 2 - 0.5))
        shade = 0.8 + 0.25 * _fbm(px * 3 + pz * 3, py * 3, self.config.seed + 6)[..., None]
        colour = np.where(glass[..., None], np.array([40.0, 50.0, 65.0]), np.asarray(box.colour))
        colour = np.where((py < 0.35)[..., None], np.array([25.0, 25.0, 25.0]), colour) * shade
        canvas.paint(win, hit, s, self._cls(box.cls), colour, (box.vx, 0.0, box.vz))


class _Canvas:
    """Depth-tested frame buffers: colour, class, depth and the velocity of the visible surface."""

    def __init__(self, height: int, width: int, background: np.ndarray, background_class: int) -> None:
        self.depth = np.full((height, width), np.inf)
        self.label = np.full((height, width), background_class, dtype=np.uint8)
        self.rgb = background
        self.vel = np.zeros((height, width, 3))

    def paint(self, win: tuple[slice, slice], mask: np.ndarray, s: np.ndarray, cls: int,
              colour: np.ndarray, velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        """Where ``mask`` holds and ``s`` is nearer than what is drawn, draw class ``cls``.

        Args:
            win: (rows, cols) window the other arrays cover.
            mask, s: (h, w) coverage and depth inside the window.
            colour: (h, w, 3) or (3,) colour.
        """
        depth = self.depth[win]
        hit = mask & (s > _NEAR) & (s < depth)
        if not hit.any():
            return
        depth[hit] = s[hit]
        self.label[win][hit] = cls
        self.rgb[win][hit] = colour[hit] if colour.ndim == 3 else colour
        self.vel[win][hit] = velocity


def drive_configs(count: int, base: SyntheticConfig) -> list[SyntheticConfig]:
    """``count`` drives that differ only in seed (base seed, base seed + 1, ...)."""
    return [base.model_copy(update={"seed": base.seed + i}) for i in range(count)]


# --- rendering in several processes -------------------------------------------------------------

# drives smaller than this (frames x pixels, all drives together) render in the calling process:
# about 5 s of one core's rendering (~1.4 us a pixel), where starting worker processes costs ~1 s
RENDER_POOL_PIXELS = 4_000_000


def render_workers(configs: list[SyntheticConfig]) -> int:
    """Processes to render ``configs`` in: one per core (``$AUTOLABEL_THREADS`` caps them) when the
    drives hold at least ``RENDER_POOL_PIXELS`` pixels of frames, else 1 (the calling process)."""
    pixels = sum(c.width * c.height * c.frames for c in configs)
    return compute_threads() if pixels >= RENDER_POOL_PIXELS else 1


_WORKER_DRIVE: SyntheticDrive | None = None


def _render_in_worker(config: SyntheticConfig, t: int) -> RenderedFrame:
    """Frame ``t`` of the drive ``config`` (its scene built once per worker and drive)."""
    global _WORKER_DRIVE
    if _WORKER_DRIVE is None or _WORKER_DRIVE.config != config:
        _WORKER_DRIVE = SyntheticDrive(config)
    return _WORKER_DRIVE.render(t)


class FrameRenderer(HoldsWorkerPool):
    """Renders drives' frames in order, in ``workers`` processes (in the calling one when 1).

    A frame depends only on its drive's config and its index, so the frames are those of
    :meth:`SyntheticDrive.render`, bit for bit, whatever the workers. At most 2 x ``workers``
    frames are in flight (memory does not grow with the drive), and the workers exit with the
    process that started them. Use as a context manager, one renderer for many drives.
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._pool = WorkerPool(self.workers) if self.workers > 1 else None

    def frames(self, config: SyntheticConfig) -> Iterator[RenderedFrame]:
        """Frames 0 .. ``config.frames`` - 1 of the drive, in order."""
        if self._pool is None:
            drive = SyntheticDrive(config)
            yield from (drive.render(t) for t in range(config.frames))
            return
        try:
            yield from self._pool.ordered(_render_in_worker, ((config, t) for t in range(config.frames)))
        except BrokenProcessPool as exc:
            raise RenderError(f"a render worker process died while rendering drive seed={config.seed} (killed, "
                              f"or out of memory with {self.workers} workers); run again, with "
                              "AUTOLABEL_THREADS set lower if memory is short") from exc
