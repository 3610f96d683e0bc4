r"""Procedural walking silhouettes in OpenGait's CASIA-B pickle layout.

A stand-in for CASIA-B that anyone can generate: a recognition task that is learnable (identity
lives in body shape and gait) but not trivial (views and bag / coat covariates change the
silhouette, identities overlap, segmentation is noisy).

Model (units: about one stature; x forward, y up, z to the walker's left):

* **Body.** Pelvis, torso (a tapered slab whose projected width depends on the view: lateral
  half-width ``a`` and sagittal half-depth ``b`` project to ``sqrt((a cos v)^2 + (b sin v)^2)``),
  neck, an elliptic head, thighs, shanks, feet, upper arms and forearms as tapered capsules.
* **Identity** (fixed per subject): ~20 shape parameters (leg, thigh / shank split, torso,
  arm lengths, hip / shoulder width, torso depth, limb thickness, head size, forward lean,
  head carriage) and ~12 gait parameters (cycle length = cadence, hip-swing amplitude = stride,
  knee flexion in swing and stance, arm swing and elbow bend, left/right phase and amplitude
  asymmetry, pelvis yaw, lateral sway). Each is ``mean + between * z_subject``, and every
  sequence adds ``within * z_sequence``: identities overlap in parameter space.
* **Kinematics.** Phase ``phi`` advances by ``2 pi / cycle`` per frame from a random start;
  the hip angle is sinusoidal, the knee flexes with a swing bump and a stance bump, the foot
  pitches with the shank, arms swing in anti-phase with the legs, the pelvis yaws and the
  shoulders counter-rotate; small per-frame angle jitter.
* **Views.** CASIA-B's convention (000 front, 090 side, 180 back). Each view is one fixed
  camera of the tree: a pinhole 2.2-3.2 statures away, 8-18 degrees above, looking down at
  the hips (image column ``u = -x sin v + z cos v``, depth along ``x cos v + z sin v``), with
  its own segmentation habits (fatter or thinner masks, where holes appear, how often floor
  shadows show). Perspective, pitch, the floor shadow of the lower legs under a fixed room
  light and those habits make 000 / 180 and 054 / 126 differ, as in CASIA-B (a symmetric body
  under orthographic projection would look the same from both). Per sequence, +-1.5 degrees
  of view jitter and +-5% distance.
* **Covariates.** ``bg``: a per-subject bag (backpack, shoulder bag at the hip, or hand-held bag
  that also damps that arm's swing; carrying damps both arms a little, a backpack adds lean).
  ``cl``: a per-subject coat: bulkier torso, upper arms and thighs, and a skirt from the waist
  down to 40-110% of the thigh whose width follows the stride.
* **Segmentation noise**, its strength drawn per sequence, events per frame: the boundary grows
  or shrinks by a pixel in blobs (a coarse random field picks dilation or erosion), a missing
  elliptic chunk (background that matched the clothes), a shadow blob at the feet.

Frames are rasterised at 62 pixels per stature (a ~60-pixel-tall person) (each primitive in a small window, vectorised
over frames), then go through :func:`qgait.data.preprocess.normalise_frame` exactly as real
frames do, and are written as uint8 ``[T, 64, 64]`` pickles:
``root/<subject>/<condition>/<view>/<view>.pkl``.

Every sequence's random stream is seeded from ``(seed, subject, condition, view)`` alone, so
a tree is reproducible byte for byte and independent of the worker count.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from qgait.data.pickle_io import save_pickle
from qgait.data.preprocess import normalise_frame, resize_weights

__all__ = [
    "ALL_VIEWS",
    "CONDITIONS",
    "VIEWS",
    "generate",
    "generate_sequence",
    "preview",
    "sample_identity",
]

CONDITIONS = tuple([f"nm-0{i}" for i in range(1, 7)] + ["bg-01", "bg-02", "cl-01", "cl-02"])
ALL_VIEWS = tuple(f"{a:03d}" for a in range(0, 181, 18))  # CASIA-B's 11 views
VIEWS = ("000", "054", "090", "126", "180")

# name: (mean, between-subject std, within-subject std). Lengths in statures, angles in rad.
_D = np.pi / 180
_PARAMS = {
    # shape
    "leg": (0.47, 0.018, 0.002),         # hip height
    "thigh_frac": (0.50, 0.025, 0.002),  # thigh / (thigh + shank)
    "torso": (0.30, 0.015, 0.002),
    "neck": (0.035, 0.008, 0.001),
    "head_r": (0.062, 0.005, 0.0005),
    "head_aspect": (1.18, 0.06, 0.005),
    "hip_w": (0.078, 0.008, 0.001),      # hip joint lateral offset
    "sh_w": (0.102, 0.009, 0.001),        # shoulder lateral offset
    "depth": (0.078, 0.010, 0.002),      # torso sagittal half-depth
    "belly": (0.0, 0.012, 0.002),        # extra depth at the waist
    "thigh_r": (0.054, 0.006, 0.001),
    "shank_r": (0.033, 0.004, 0.0008),
    "arm_r": (0.026, 0.003, 0.0008),
    "upper_arm": (0.17, 0.010, 0.001),
    "forearm": (0.16, 0.010, 0.001),
    "foot": (0.12, 0.010, 0.001),
    "lean": (4 * _D, 3 * _D, 0.8 * _D),
    "head_fwd": (0.012, 0.012, 0.002),
    "arm_abd": (0.006, 0.006, 0.002),    # hands held away from the body
    # gait
    "cycle": (28.0, 2.6, 0.7),           # frames per gait cycle (25 fps)
    "hip_amp": (21 * _D, 3.0 * _D, 1.0 * _D),
    "hip_off": (4 * _D, 2.5 * _D, 0.8 * _D),
    "knee_swing": (58 * _D, 7 * _D, 2.5 * _D),
    "knee_stance": (14 * _D, 5 * _D, 2 * _D),
    "arm_amp": (20 * _D, 8 * _D, 3 * _D),
    "arm_off": (2 * _D, 4 * _D, 1.5 * _D),
    "elbow": (14 * _D, 7 * _D, 2 * _D),
    "elbow_amp": (16 * _D, 6 * _D, 2 * _D),
    "asym_phase": (0.0, 0.10, 0.03),
    "asym_amp": (1.0, 0.07, 0.02),
    "yaw": (5 * _D, 2.5 * _D, 1 * _D),
    "sway": (0.012, 0.005, 0.002),
    "lean_osc": (1.5 * _D, 1 * _D, 0.5 * _D),
}
_NAMES = list(_PARAMS)
_MEAN = np.array([v[0] for v in _PARAMS.values()])
_BETWEEN = np.array([v[1] for v in _PARAMS.values()])
_WITHIN = np.array([v[2] for v in _PARAMS.values()])


def sample_identity(seed: int, subject: int) -> dict:
    """The fixed parameters of one subject: body and gait (``z`` scores), bag and coat."""
    rng = np.random.default_rng([seed, 0, subject])
    z = np.clip(rng.standard_normal(len(_NAMES)), -2.5, 2.5)
    bag_kind = int(rng.integers(3))  # 0 backpack, 1 shoulder bag at the hip, 2 hand-held
    return {
        "z": z,
        "bag": {"kind": bag_kind, "side": int(rng.choice([-1, 1])),
                "size": rng.uniform(0.8, 1.25, 3), "drop": rng.uniform(0.0, 0.06)},
        "coat": {"bulk": rng.uniform(1.15, 1.45), "len": rng.uniform(0.4, 1.1),
                 "flare": rng.uniform(1.1, 1.5), "arm": rng.uniform(1.2, 1.5)},
    }


def _seq_params(identity: dict, rng: np.random.Generator) -> dict:
    v = _MEAN + _BETWEEN * identity["z"] + _WITHIN * rng.standard_normal(len(_NAMES))
    return dict(zip(_NAMES, v))


def _rot(x, z, a):
    """Rotates (x, z) about the vertical axis by a."""
    c, s = np.cos(a), np.sin(a)
    return c * x - s * z, s * x + c * z


def _wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def _pose(p: dict, phi: np.ndarray, rng: np.random.Generator, handbag_side: int = 0) -> dict:
    """Joint positions [F, 3] (x, y, z) over gait phases ``phi`` [F]."""
    F = phi.shape[0]
    zero = np.zeros(F)
    jit = lambda s: rng.normal(0.0, s, F)
    pelvis = np.stack([zero, p["leg"] + 0.01 * np.cos(2 * phi), p["sway"] * np.sin(phi)], -1)
    yaw = p["yaw"] * np.sin(phi)
    leg_len = p["leg"] * 1.03  # knees never fully straight: a little longer than hip height
    L_th, L_sh = leg_len * p["thigh_frac"], leg_len * (1 - p["thigh_frac"])
    J = {"pelvis": pelvis}
    for side, sgn, ph, amp in (("L", 1.0, phi, 1.0),
                               ("R", -1.0, phi + np.pi + p["asym_phase"], p["asym_amp"])):
        hx, hz = _rot(0.0, sgn * p["hip_w"], yaw)
        hip = pelvis + np.stack([hx, zero, hz], -1)
        a_h = p["hip_off"] + amp * p["hip_amp"] * np.sin(ph) + jit(1.0 * _D)
        knee_flex = (5 * _D + amp * p["knee_swing"] * np.exp(-(_wrap(ph + 0.35) / 0.8) ** 2)
                     + p["knee_stance"] * np.exp(-(_wrap(ph - 2.2) / 0.6) ** 2) + jit(1.5 * _D))
        a_s = a_h - knee_flex
        knee = hip + L_th * np.stack([np.sin(a_h), -np.cos(a_h), zero], -1)
        ankle = knee + L_sh * np.stack([np.sin(a_s), -np.cos(a_s), zero], -1)
        pitch = 0.6 * a_s
        fdir = np.stack([np.cos(pitch), np.sin(pitch), zero], -1)
        J["hip" + side], J["knee" + side], J["ankle" + side] = hip, knee, ankle
        J["heel" + side] = ankle - 0.25 * p["foot"] * fdir
        J["toe" + side] = ankle + 0.75 * p["foot"] * fdir
        J["ah" + side] = a_h
    lean = p["lean"] + p["lean_osc"] * np.sin(2 * phi)
    up = np.stack([np.sin(lean), np.cos(lean), zero], -1)
    J["neck"] = pelvis + p["torso"] * up
    J["shoulder_c"] = pelvis + 0.92 * p["torso"] * up
    syaw = -0.8 * yaw
    for side, sgn, leg in (("L", 1.0, "L"), ("R", -1.0, "R")):
        sx, sz = _rot(0.0, sgn * p["sh_w"], syaw)
        sh = J["shoulder_c"] + np.stack([sx, zero, sz], -1)
        swing = p["arm_amp"] * (0.3 if handbag_side == sgn else 1.0)
        # the arm swings against its own side's leg (with the opposite leg)
        a_a = p["arm_off"] - swing / max(p["hip_amp"], 1e-3) * (J["ah" + leg] - p["hip_off"])
        a_a = a_a + jit(1.5 * _D)
        e = p["elbow"] + p["elbow_amp"] * 0.5 * (1 + np.sin(a_a / max(swing, 1e-3)))
        if handbag_side == sgn:
            e = 0.3 * e
        abd = sgn * p["arm_abd"]
        elbow = sh + np.stack([p["upper_arm"] * np.sin(a_a), -p["upper_arm"] * np.cos(a_a),
                               zero + 0.5 * abd], -1)
        wrist = elbow + np.stack([p["forearm"] * np.sin(a_a + e), -p["forearm"] * np.cos(a_a + e),
                                  zero + abd], -1)
        J["shoulder" + side], J["elbow" + side], J["wrist" + side] = sh, elbow, wrist
    tilt = lean + 0.5 * p["lean"]
    J["head"] = (J["neck"] + (p["neck"] + p["head_r"] * p["head_aspect"])
                 * np.stack([np.sin(tilt), np.cos(tilt), zero], -1)
                 + np.array([p["head_fwd"], 0.0, 0.0]))
    return J


class _Camera:
    """A pinhole camera at horizontal distance ``dist`` (statures) from the walker, in the
    direction of CASIA-B view ``view_deg``, looking down by ``pitch`` (radians) at the
    point ``aim`` statures above the floor. Nearer parts look bigger and, the camera being
    above, lower: a walker seen from 054 and from 126 (or 000 / 180) differs, as in CASIA-B,
    where a symmetric body under orthographic projection would look identical."""

    def __init__(self, view_deg: float, dist: float, pitch: float = 0.0, aim: float = 0.5):
        v = view_deg * _D
        self.s, self.c, self.dist = np.sin(v), np.cos(v), dist
        self.cp, self.sp = np.cos(pitch), np.sin(pitch)
        self.height = aim + dist * np.tan(pitch)

    def __call__(self, P):
        """[..., 3] -> (u, v, scale): image coordinates (statures at the aim point, v up)
        and the local magnification."""
        x, y, z = P[..., 0], P[..., 1], P[..., 2]
        fwd = self.dist - (x * self.c + z * self.s)  # horizontal distance along the view
        up = y - self.height
        depth = fwd * self.cp - up * self.sp
        k = self.dist / self.cp / depth
        return (-x * self.s + z * self.c) * k, (up * self.cp + fwd * self.sp) * k, k

    def width(self, a, b):
        """Projected half-width of a horizontal ellipse with lateral a, sagittal b."""
        return np.sqrt((a * self.c) ** 2 + (b * self.s) ** 2)


# The room's light, fixed relative to the walking path as CASIA-B's cameras are: it casts a
# floor shadow of the lower legs whose image shape depends on the view (and differs between
# front and back views, which a symmetric body alone would make near mirror images).
_LIGHT = np.array([0.45, -1.0, 0.6]) / np.linalg.norm([0.45, -1.0, 0.6])


def _shapes(J: dict, p: dict, cam: _Camera, cond: str, ident: dict, phi: np.ndarray,
            shadow: float = 0.0):
    """Primitives in image space: lists of (p0, p1, r0, r1, flat) capsules, (c, rx, ry)
    ellipses; ``shadow`` in [0, 1] is how much of the shank casts a visible floor shadow."""
    caps, ells = [], []
    coat = cond.startswith("cl")
    ct = ident["coat"]
    bulk = ct["bulk"] if coat else 1.0

    def cap(a, b, ra, rb, flat=False):
        ua, va, ka = cam(a)
        ub, vb, kb = cam(b)
        caps.append((np.stack([ua, va], -1), np.stack([ub, vb], -1), ra * ka, rb * kb, flat))

    for s in "LR":
        thr = p["thigh_r"] * (1.12 if coat else 1.0)
        cap(J["hip" + s], J["knee" + s], thr, p["shank_r"] * 1.1)
        cap(J["knee" + s], J["ankle" + s], p["shank_r"] * 1.1, p["shank_r"] * 0.75)
        cap(J["heel" + s], J["toe" + s], 0.024, 0.018)
        ar = p["arm_r"] * (ct["arm"] if coat else 1.0)
        cap(J["shoulder" + s], J["elbow" + s], ar * 1.05, ar * 0.9)
        cap(J["elbow" + s], J["wrist" + s], ar * 0.9 * (1.1 if coat else 1.0), ar * 0.8)
    yaw = p["yaw"] * np.sin(phi)
    # the pelvis yaws and the shoulders counter-rotate: the view seen by each is v +- yaw.
    # Torso = two trapezoids, hips -> waist -> chest; the arms hang outside the chest.
    v = np.arctan2(cam.s, cam.c)
    hip_w = (p["hip_w"] + 0.35 * p["thigh_r"]) * bulk
    chest_w = 0.8 * p["sh_w"] * bulk
    dep = p["depth"] * bulk

    def width(a, b, rot):
        return np.sqrt((a * np.cos(v + rot)) ** 2 + (b * np.sin(v + rot)) ** 2)

    w0 = width(hip_w, dep * 0.95, yaw)
    w1 = width(0.9 * min(hip_w, chest_w) + 0.1 * max(hip_w, chest_w),
               dep + p["belly"] * bulk, 0.1 * yaw)
    w2 = width(chest_w, dep, -0.8 * yaw)
    base = J["pelvis"] - 0.07 * (J["neck"] - J["pelvis"]) / p["torso"]
    waist = J["pelvis"] + 0.4 * (J["shoulder_c"] - J["pelvis"])
    (ub, vb, kb), (uw, vw, kw), (us, vs, ks) = cam(base), cam(waist), cam(J["shoulder_c"])
    caps.append((np.stack([ub, vb], -1), np.stack([uw, vw], -1), w0 * kb, w1 * kw, True))
    caps.append((np.stack([uw, vw], -1), np.stack([us, vs], -1), w1 * kw, w2 * ks, True))
    # rounded shoulders: a bar between the shoulder joints
    cap(J["shoulderL"], J["shoulderR"], p["arm_r"] * 1.3 * bulk, p["arm_r"] * 1.3 * bulk)
    cap(J["neck"] - 0.03 * (J["neck"] - J["pelvis"]), J["head"], 0.03 * (1.3 if coat else 1.0),
        0.026)
    # head
    uh, vh, kh = cam(J["head"])
    ells.append((np.stack([uh, vh], -1), cam.width(p["head_r"], p["head_r"] * 1.1) * kh,
                 p["head_r"] * p["head_aspect"] * kh))
    if coat:
        f = ct["len"]
        hemL = J["hipL"] + f * (J["kneeL"] - J["hipL"])
        hemR = J["hipR"] + f * (J["kneeR"] - J["hipR"])
        hem = 0.5 * (hemL + hemR)
        sag = 0.5 * np.abs(hemL[:, 0] - hemR[:, 0]) + p["thigh_r"] * 1.3
        lat = hip_w * ct["flare"]
        uh0, vh0, kh0 = cam(waist)
        uh1, vh1, kh1 = cam(hem)
        caps.append((np.stack([uh0, vh0], -1), np.stack([uh1, vh1], -1),
                     w1 * kh0, cam.width(lat, sag) * kh1, True))
    if cond.startswith("bg"):
        b = ident["bag"]
        sx, sy, sz = b["size"]
        if b["kind"] == 0:  # backpack on the back, below the shoulders
            c = J["shoulder_c"] + np.array([-(p["depth"] + 0.045 * sx), -0.09 - b["drop"], 0.0])
            rl, rs, ry = 0.10 * sz, 0.05 * sx, 0.11 * sy
        elif b["kind"] == 1:  # shoulder bag hanging at the hip
            c = J["pelvis"] + np.stack([-0.02 + 0.015 * np.sin(phi),  # swings a little
                                        np.full_like(phi, -0.03 - b["drop"]),
                                        np.full_like(phi, b["side"] * (p["hip_w"] + 0.06))], -1)
            rl, rs, ry = 0.035 * sz, 0.09 * sx, 0.08 * sy
        else:  # a bag held in one hand
            side = "L" if b["side"] > 0 else "R"
            c = J["wrist" + side] + np.array([0.0, -0.06 * sy - 0.02, 0.02 * b["side"]])
            rl, rs, ry = 0.03 * sz, 0.08 * sx, 0.065 * sy
        uc, vc, kc = cam(c)
        ells.append((np.stack([uc, vc], -1), cam.width(rl, rs) * kc, ry * kc))
    if shadow > 0:
        def floor(P):
            return P - (P[:, 1:2] / _LIGHT[1]) * _LIGHT

        for sd in "LR":
            top = J["ankle" + sd] + shadow * (J["knee" + sd] - J["ankle" + sd])
            cap(floor(top), floor(J["ankle" + sd]), 0.012, 0.02)
            cap(floor(J["heel" + sd]), floor(J["toe" + sd]), 0.02, 0.016)
    return caps, ells


def _raster(caps, ells, F: int, res: float):
    """Rasterises primitives (statures) at ``res`` pixels per stature: bool [F, H, W]."""
    def px(pt):  # (u, v) statures -> (col, row) pixels, rows downwards
        return np.stack([pt[..., 0] * res, -pt[..., 1] * res], -1)

    prims = []
    for p0, p1, r0, r1, flat in caps:
        a, b = px(p0), px(p1)
        ra, rb = r0 * res, r1 * res
        rm = np.maximum(ra, rb)[:, None]
        prims.append(("flat" if flat else "cap", a, b, ra, rb, np.minimum(a, b) - rm,
                      np.maximum(a, b) + rm))
    for c, rx, ry in ells:
        cc = px(c)
        r = np.stack([rx * res, ry * res], -1)
        prims.append(("ell", cc, r, None, None, cc - r, cc + r))
    lo = np.floor(np.min([q[5].min(axis=0) for q in prims], axis=0)).astype(int) - 2
    hi = np.ceil(np.max([q[6].max(axis=0) for q in prims], axis=0)).astype(int) + 2
    wins = [np.ceil((q[6] - np.floor(q[5])).max(axis=0)).astype(int) + 1 for q in prims]
    pad = np.max(wins, axis=0)
    H, W = hi[1] - lo[1] + pad[1], hi[0] - lo[0] + pad[0]
    canvas = np.zeros((F, H, W), bool)
    fi = np.arange(F)[:, None, None]
    for q, win in zip(prims, wins):
        o = np.floor(q[5]).astype(int)  # window origin per frame (col, row)
        # coordinates relative to the window origin: small numbers, float32 is exact enough
        xs = (np.arange(win[0], dtype=np.float32) + 0.5)[None, None, :]  # [1, 1, wx]
        ys = (np.arange(win[1], dtype=np.float32) + 0.5)[None, :, None]  # [1, wy, 1]
        if q[0] != "ell":
            # tapered capsule: distance to the axis point t, radius interpolated along it;
            # "flat" ones (torso, coat) end square: a trapezoid
            a, b = (q[1] - o).astype(np.float32), (q[2] - o).astype(np.float32)
            ra, rb = q[3].astype(np.float32)[:, None, None], q[4].astype(np.float32)[:, None, None]
            ex, ey = (b - a)[:, 0, None, None], (b - a)[:, 1, None, None]
            dx, dy = xs - a[:, 0, None, None], ys - a[:, 1, None, None]
            t_raw = (dx * ex + dy * ey) / np.maximum(ex * ex + ey * ey, 1e-9)
            t = np.clip(t_raw, 0.0, 1.0)
            r = ra + t * (rb - ra)
            m = (dx - t * ex) ** 2 + (dy - t * ey) ** 2 < r * r
            if q[0] == "flat":
                m &= t == t_raw
        else:
            c, r = (q[1] - o).astype(np.float32), q[2].astype(np.float32)
            m = (((xs - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
                 + ((ys - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2) < 1.0
        Y = o[:, 1, None, None] - lo[1] + np.arange(win[1])[None, :, None]
        X = o[:, 0, None, None] - lo[0] + np.arange(win[0])[None, None, :]
        canvas[fi, Y, X] |= m
    return canvas


def _shift_or(m, op):
    """3x3 cross dilation (op=np.logical_or) or erosion (np.logical_and) of bool [F, H, W]."""
    out = m.copy()
    out[:, 1:] = op(out[:, 1:], m[:, :-1])
    out[:, :-1] = op(out[:, :-1], m[:, 1:])
    out[:, :, 1:] = op(out[:, :, 1:], m[:, :, :-1])
    out[:, :, :-1] = op(out[:, :, :-1], m[:, :, 1:])
    return out


def _camera_style(seed: int, view: str) -> dict:
    """One camera's fixed geometry and segmentation habits (its background and lighting):
    the same for every sequence seen by that view, different between views."""
    r = np.random.default_rng([seed, 3, int(view)])
    return {"dist": r.uniform(2.2, 3.2), "pitch": r.uniform(8, 18) * _D,
            "bias": r.normal(0.0, 0.5), "hole_rate": r.uniform(0.0, 0.3),
            "hole_band": r.uniform(0.25, 0.85), "shadow": r.uniform(0.2, 1.0)}


def _noise(canvas: np.ndarray, rng: np.random.Generator, style: dict) -> np.ndarray:
    """Segmentation noise: the camera's habits, a strength drawn per sequence, events per
    frame."""
    F, H, W = canvas.shape
    q = rng.uniform(0.0, 1.0)
    dil = _shift_or(canvas, np.logical_or)
    ero = _shift_or(canvas, np.logical_and)
    # boundary noise: a coarse random field (one value per 6x6 pixel cell, bilinearly
    # upsampled) picks where the boundary grows (dilation) or shrinks (erosion), so edges
    # wobble in blobs as real segmentation does, not pixel by pixel
    cell = 6
    coarse = rng.standard_normal((F, H // cell + 2, W // cell + 2)).astype(np.float32)
    field = resize_weights(coarse.shape[1], H) @ coarse @ resize_weights(coarse.shape[2], W).T
    # per frame, a global bias: some frames are fatter or thinner overall
    field += rng.normal(style["bias"], 0.3 + 0.4 * q, F).astype(np.float32)[:, None, None]
    thr = 1.2 - 0.5 * q
    out = np.where(field > thr, dil, np.where(field < -thr, ero, canvas))
    rows = canvas.any(axis=2)
    top = rows.argmax(axis=1)
    bot = H - 1 - rows[:, ::-1].argmax(axis=1)
    cols = canvas.any(axis=1)
    left = cols.argmax(axis=1)
    right = W - 1 - cols[:, ::-1].argmax(axis=1)
    yy, xx = np.arange(H)[None, :, None], np.arange(W)[None, None, :]

    def ellipses(f, cy, cx, ry, rx):  # bool [len(f), H, W]
        return (((yy - cy[:, None, None]) / ry[:, None, None]) ** 2
                + ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2) < 1

    # a missing chunk: background matched the clothes somewhere inside the body's box, at
    # the height this camera's background tends to match
    f = np.flatnonzero(rng.random(F) < 0.03 + 0.15 * q + style["hole_rate"])
    if f.size:
        n = f.size
        cy = top[f] + np.clip(rng.normal(style["hole_band"], 0.2, n), 0.1, 0.95) * (bot[f] - top[f])
        cx = left[f] + rng.uniform(0.0, 1.0, n) * (right[f] - left[f])
        out[f] &= ~ellipses(f, cy, cx, rng.uniform(2, 7, n), rng.uniform(2, 9, n))
    # a shadow blob at the feet
    f = np.flatnonzero(rng.random(F) < 0.03 + 0.12 * q)
    if f.size:
        n = f.size
        cx = 0.5 * (left[f] + right[f]) + rng.normal(0, 3, n)
        out[f] |= ellipses(f, bot[f].astype(float), cx, rng.uniform(1, 2.5, n),
                           rng.uniform(4, 10, n))
    return out


def generate_sequence(seed: int, subject: int, condition: str, view: str,
                      frames: tuple[int, int] = (60, 100), res: float = 62.0,
                      noise: bool = True) -> np.ndarray:
    """One sequence: uint8 ``[T, 64, 64]`` (0..255), as an OpenGait pickle holds.

    Args:
        seed: the tree's seed.
        subject: the subject number (0-based; named ``f"{subject + 1:03d}"`` on disk).
        condition: a CASIA-B condition name, e.g. ``"nm-01"``, ``"bg-02"``, ``"cl-01"``.
        view: a view angle in degrees as a string, e.g. ``"090"`` (any 0..180 works).
        frames: inclusive range of the sequence length T.
        res: rasterisation pixels per stature (the person is ~0.95 stature tall).
        noise: add segmentation noise (False: clean silhouettes, for inspection).
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    lo, hi = frames
    if not 1 <= lo <= hi:
        raise ValueError(f"frames must be (min, max) with 1 <= min <= max, got {frames}")
    ident = sample_identity(seed, subject)
    rng = np.random.default_rng([seed, 2, subject, CONDITIONS.index(condition), int(view)])
    p = _seq_params(ident, rng)
    T = int(rng.integers(lo, hi + 1))
    phi = rng.uniform(0, 2 * np.pi) + 2 * np.pi * (np.arange(T) + rng.normal(0, 0.05, T)) \
        / p["cycle"]
    bag = ident["bag"]
    handbag = bag["side"] if condition.startswith("bg") and bag["kind"] == 2 else 0
    if condition.startswith("bg"):  # carrying damps the arm swing, a backpack adds lean
        p["arm_amp"] *= 0.8
        if bag["kind"] == 0:
            p["lean"] += 2 * _D
    J = _pose(p, phi, rng, handbag_side=handbag)
    # Each view is one fixed camera of the tree (CASIA-B's are a few metres away, above the
    # walker), jittered a little per sequence.
    style = _camera_style(seed, view)
    cam = _Camera(float(view) + rng.normal(0, 1.5), dist=style["dist"] * rng.uniform(0.95, 1.05),
                  pitch=style["pitch"] + rng.normal(0, 1) * _D)
    shadow = rng.uniform(0.2, 0.8) if rng.random() < style["shadow"] else 0.0
    caps, ells = _shapes(J, p, cam, condition, ident, phi, shadow)
    canvas = _raster(caps, ells, T, res)
    if noise:
        canvas = _noise(canvas, rng, style)
    out = [normalise_frame(f.view(np.uint8) * np.uint8(255)) for f in canvas]
    out = [f for f in out if f is not None]
    return np.stack(out)


def _subject_job(args):
    root, seed, subject, conditions, views, frames, gz = args
    n = 0
    for c in conditions:
        for v in views:
            arr = generate_sequence(seed, subject, c, v, frames)
            name = f"{v}.pkl.gz" if gz else f"{v}.pkl"
            save_pickle(Path(root) / f"{subject + 1:03d}" / c / v / name, arr, compresslevel=1)
            n += arr.shape[0]
    return n


def generate(root, n_subjects: int = 40, views: Sequence[str] = VIEWS,
             conditions: Sequence[str] = CONDITIONS, frames: tuple[int, int] = (60, 100),
             seed: int = 0, workers: int | None = None, progress: bool = True,
             gzip: bool = False) -> dict:
    """Writes a synthetic CASIA-B-like tree ``root/<subject>/<condition>/<view>/<view>.pkl``.

    Args:
        root: output folder (created; existing files of the same names are replaced).
        n_subjects: subjects ``001 .. n_subjects``.
        views: view angles as 3-digit strings (default CASIA-B's 000 / 054 / 090 / 126 / 180).
        conditions: subset of :data:`CONDITIONS` (nm-01..06, bg-01..02, cl-01..02).
        frames: inclusive (min, max) sequence length.
        seed: the tree's seed; the same seed gives the same bytes whatever ``workers`` is.
        workers: processes (default: CPU count; 0 or 1 runs in this process).
        progress: show a tqdm bar.
        gzip: write ``<view>.pkl.gz`` (about 8x smaller, ~20% slower) instead of ``.pkl``.

    Returns:
        ``{"subjects": n, "sequences": n, "frames": n}``.
    """
    views = [str(v) for v in views]
    for v in views:
        if not (v.isdigit() and len(v) == 3 and 0 <= int(v) <= 180):
            raise ValueError(f"views must be 3-digit angles in 000..180, got {v!r}")
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; expected some of {CONDITIONS}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, s, list(conditions), views, tuple(frames), bool(gzip))
            for s in range(n_subjects)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="synthetic subjects", unit="subj", leave=False)
    total = 0
    if workers <= 1:
        for j in jobs:
            total += _subject_job(j)
            if bar:
                bar.update()
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            for n in pool.map(_subject_job, jobs):
                total += n
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return {"subjects": n_subjects, "sequences": n_subjects * len(views) * len(conditions),
            "frames": total}


def preview(root, out_png, subjects: int = 3, frames: int = 8,
            conditions: Sequence[str] = ("nm-01", "bg-01", "cl-01"),
            views: Sequence[str] = VIEWS) -> Path:
    """Writes a montage PNG of a pickle tree: one row per (subject, condition), one column
    block per view, ``frames`` evenly spaced frames each. Returns the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qgait.data.pickle_io import load_pickle

    root = Path(root)
    subs = sorted(d.name for d in root.iterdir() if d.is_dir())[:subjects]
    rows = []
    labels = []
    for s in subs:
        for c in conditions:
            strip = []
            for v in views:
                d = root / s / c / v
                files = sorted(d.glob("*.pkl*")) if d.is_dir() else []
                if not files:
                    strip.append(np.zeros((64, 64 * frames), np.uint8))
                    continue
                a = load_pickle(files[0])
                t = np.linspace(0, a.shape[0] - 1, frames).astype(int)
                strip.append(np.concatenate(list(a[t]), axis=1))
                strip.append(np.full((64, 4), 128, np.uint8))
            rows.append(np.concatenate(strip, axis=1))
            labels.append(f"{s} {c}")
    img = np.concatenate([np.pad(r, ((2, 2), (0, 0)), constant_values=128) for r in rows])
    fig, ax = plt.subplots(figsize=(img.shape[1] / 60, img.shape[0] / 60), dpi=100)
    ax.imshow(img, cmap="gray", interpolation="nearest")
    ax.set_yticks([68 * i + 34 for i in range(len(labels))], labels, fontsize=7)
    ax.set_xticks([(64 * frames + 4) * (j + 0.5) for j in range(len(views))],
                  [f"view {v}" for v in views], fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
