"""MJCF scenes of the contact benchmark (`world/contact.py`), written for this project.

One world frame in metres: the fixture's top face is z = 0, the workspace centre is x = y = 0. A carriage on three
position-controlled slide joints (x, y, z) holds the tool (a peg or a needle) rigidly; the tool's tip is at the
carriage origin, so the joint positions are the tip position. A 6-axis force/torque sensor sits on the `ft` site at
the wrist (the tool's top). Static cameras `front` and `top` look at the workspace; the needle's carriage also carries
a `wrist` camera beside the needle, looking down at the tip region (a task's `views` say which cameras it observes:
`ContactConfig.views`). Rendering is set up for a software renderer: no shadows, no reflections, no multisampling, a
small offscreen buffer (these settings apply to every camera).
"""

from __future__ import annotations

import numpy as np

VIEWS = ("front", "top")  # the static cameras (the default views of a task)
CAMERAS = ("front", "top", "wrist")  # every camera a scene may have (`wrist` only where the carriage carries one)
HIDDEN_GROUP = 3  # geoms in this group collide but are never drawn (the default visual option hides groups 3-5)

_HEADER = """
<mujoco model="{model}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{timestep}" integrator="implicitfast" cone="pyramidal"/>
  <visual>
    <quality shadowsize="0" offsamples="0" numslices="8" numstacks="4" numquads="1"/>
    <global offwidth="{offwidth}" offheight="{offheight}" fovy="40"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
    <map znear="0.005" zfar="2"/>
  </visual>
  <default>
    <geom solref="0.004 1" solimp="0.95 0.99 0.0005" friction="0.3 0.005 0.0001" rgba="0.8 0.8 0.8 1"/>
    <default class="visual"><geom contype="0" conaffinity="0" group="1" mass="0"/></default>
  </default>
  <worldbody>
    <light name="sun" pos="0.05 -0.1 0.5" dir="-0.1 0.2 -1" castshadow="false" directional="true"
           diffuse="0.5 0.5 0.5" specular="0 0 0"/>
    <geom name="table" type="plane" pos="0 0 -0.03" size="0.3 0.3 0.01" rgba="0.15 0.15 0.17 1"/>
    <camera name="front" pos="{front_pos}" xyaxes="{front_xyaxes}" fovy="{front_fovy}"/>
    <camera name="top" pos="{top_pos}" xyaxes="{top_xyaxes}" fovy="{top_fovy}"/>
"""

_CARRIAGE = """
    <body name="hand" pos="0 0 0" gravcomp="1">
      <joint name="x" type="slide" axis="1 0 0" range="-0.06 0.06"/>
      <joint name="y" type="slide" axis="0 1 0" range="-0.06 0.06"/>
      <joint name="z" type="slide" axis="0 0 1" range="-0.04 0.08"/>
      <geom name="hand" class="visual" type="box" pos="0 0 {hand_z}" size="0.009 0.009 0.006" mass="0.2"
            rgba="0.35 0.35 0.4 1"/>
      {wrist}
      <body name="tool" pos="0 0 0" gravcomp="1">
        <site name="ft" pos="0 0 {tool_len}" size="0.002"/>
        {tool}
      </body>
    </body>
"""

_FOOTER = """
  </worldbody>
  <actuator>
    <position name="x" joint="x" kp="{kp_xy}" kv="{kv_xy}"/>
    <position name="y" joint="y" kp="{kp_xy}" kv="{kv_xy}"/>
    <position name="z" joint="z" kp="{kp_z}" kv="{kv_z}"/>
  </actuator>
  <sensor>
    <force name="ft_force" site="ft"/>
    <torque name="ft_torque" site="ft"/>
  </sensor>
</mujoco>
"""


def look_at(pos, target) -> str:
    """MJCF `xyaxes` of a camera at `pos` looking at `target` (world z up)."""
    pos, target = np.asarray(pos, float), np.asarray(target, float)
    forward = (target - pos) / np.linalg.norm(target - pos)
    x = np.cross(forward, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(-forward, x)
    return " ".join(f"{v:.6f}" for v in (*x, *y))


def _fmt(v) -> str:
    return " ".join(f"{float(a):.6f}" for a in v)


def _cameras(image_size: int) -> dict[str, str]:
    front, top = (0.0, -0.15, 0.045), (0.0, -0.07, 0.13)
    return {
        "front_pos": _fmt(front),
        "front_xyaxes": look_at(front, (0.0, 0.0, 0.008)),
        "front_fovy": "30",
        "top_pos": _fmt(top),
        "top_xyaxes": look_at(top, (0.0, 0.0, 0.0)),
        "top_fovy": "34",
        "offwidth": str(max(image_size, 64)),
        "offheight": str(max(image_size, 64)),
    }


def wrist_camera_xml(
    offset_mm: tuple[float, float, float] = (0.0, -12.0, 30.0),
    aim_below_tip_mm: float = 3.0,
    fovy_deg: float = 45.0,
) -> str:
    """A camera `wrist` on the carriage (in the `hand` body, whose origin is the tool's tip; the hand only
    translates, so its frame stays the world's): at `offset_mm` from the tip (sideways, so that the needle's shaft
    runs up from the view's centre and does not cover it), aimed `aim_below_tip_mm` under the tip (the surface at the
    needle expert's approach height is at the view's centre). Defaults: 12 mm beside the needle and 30 mm above the
    tip, 45 deg: at the approach height (3 mm) about 0.45 mm per pixel at 64 px, the entry mark's 2 mm dark dot about
    8 px across, the 10 mm mark in view while the tip is within about 10 mm of it at the expert's 10 mm travel height
    (docs/sim.md)."""
    pos = np.asarray(offset_mm, float) / 1000.0
    target = (0.0, 0.0, -aim_below_tip_mm / 1000.0)
    return f'<camera name="wrist" pos="{_fmt(pos)}" xyaxes="{look_at(pos, target)}" fovy="{fovy_deg:g}"/>'


def _gains(kp_xy: float, kp_z: float, moving_mass: float) -> dict[str, str]:
    """Critically damped position servos for the carriage's moving mass."""
    return {
        "kp_xy": f"{kp_xy:g}",
        "kv_xy": f"{2 * np.sqrt(kp_xy * moving_mass):.3f}",
        "kp_z": f"{kp_z:g}",
        "kv_z": f"{2 * np.sqrt(kp_z * moving_mass):.3f}",
    }


def hole_fixture_xml(hole_half_width: float, block_half: float = 0.02, block_height: float = 0.03) -> str:
    """A block (top face at z = 0) with a square through-hole, as four wall boxes in a body `fixture` (its
    position is the hole's, set per episode), plus a bottom plate `bottom` inside the hole (its depth set per
    episode; drawn or hidden by the caller's `bottom_group`)."""
    w, b, h = hole_half_width, block_half, block_height
    wall_x = f'size="{(b - w) / 2:.6f} {b:.6f} {h / 2:.6f}"'
    wall_y = f'size="{w:.6f} {(b - w) / 2:.6f} {h / 2:.6f}"'
    c = (b + w) / 2
    rgba = 'rgba="0.82 0.72 0.52 1"'
    return f"""
    <body name="fixture" pos="0 0 0">
      <geom name="wall_px" type="box" pos="{c:.6f} 0 {-h / 2:.6f}" {wall_x} {rgba}/>
      <geom name="wall_nx" type="box" pos="{-c:.6f} 0 {-h / 2:.6f}" {wall_x} {rgba}/>
      <geom name="wall_py" type="box" pos="0 {c:.6f} {-h / 2:.6f}" {wall_y} {rgba}/>
      <geom name="wall_ny" type="box" pos="0 {-c:.6f} {-h / 2:.6f}" {wall_y} {rgba}/>
      <geom name="bottom" type="box" pos="0 0 -0.02" size="{w:.6f} {w:.6f} 0.001" group="{{bottom_group}}"
            rgba="0.1 0.1 0.1 1"/>
    </body>"""


def peg_scene_xml(
    *,
    image_size: int = 64,
    timestep: float = 0.002,
    peg_radius: float = 0.0046,
    hole_half_width: float = 0.005,
    peg_length: float = 0.04,
    bottom_visible: bool = True,
    kp_xy: float = 2000.0,
    kp_z: float = 2000.0,
) -> str:
    """The peg-in-hole scene: a capsule peg (its rounded tip finds a hole within about its radius) over a block
    with a square hole; diametral clearance 2 * (hole_half_width - peg_radius)."""
    tool = (
        f'<geom name="peg" type="capsule" fromto="0 0 {peg_radius:.6f} 0 0 {peg_length:.6f}" '
        f'size="{peg_radius:.6f}" mass="0.05" rgba="0.2 0.35 0.85 1"/>'
    )
    fields = {
        "model": "peg_in_hole",
        "timestep": f"{timestep:g}",
        **_cameras(image_size),
        "hand_z": f"{peg_length + 0.006:.6f}",
        "tool_len": f"{peg_length:.6f}",
        "tool": tool,
        "wrist": "",
        **_gains(kp_xy, kp_z, 0.25),
    }
    fixture = hole_fixture_xml(hole_half_width).replace("{bottom_group}", "0" if bottom_visible else str(HIDDEN_GROUP))
    return _HEADER.format(**fields) + fixture + _CARRIAGE.format(**fields) + _FOOTER.format(**fields)


def needle_scene_xml(
    *,
    image_size: int = 64,
    timestep: float = 0.002,
    needle_length: float = 0.04,
    tissue_depth: float = 0.03,
    kp_xy: float = 2000.0,
    kp_z: float = 2000.0,
    mark_radius: float = 0.010,
    wrist: bool = True,
) -> str:
    """The needle scene: a thin needle over a tissue block (top face at z = 0) that never collides (the tissue's
    forces come from the layered tissue model in `world/contact.py`), with a green entry mark `entry` on the surface
    (a disc of `mark_radius` m, 10 mm by default: about 13 px across in a 64 px top view, a 25 x 3 px strip in
    the grazing front view; its position set per episode) and a dark dot of a fifth of its radius at its centre.
    The layers are not drawn. `wrist`: the carriage carries the `wrist` camera (`wrist_camera_xml`)."""
    tool = (
        f'<geom name="needle" type="capsule" fromto="0 0 0.0005 0 0 {needle_length:.6f}" size="0.0006" '
        f'mass="0.02" contype="0" conaffinity="0" rgba="0.75 0.75 0.8 1"/>'
    )
    fields = {
        "model": "layered_needle",
        "timestep": f"{timestep:g}",
        **_cameras(image_size),
        "hand_z": f"{needle_length + 0.006:.6f}",
        "tool_len": f"{needle_length:.6f}",
        "tool": tool,
        "wrist": wrist_camera_xml() if wrist else "",
        **_gains(kp_xy, kp_z, 0.22),
    }
    tissue = f"""
    <geom name="tissue" class="visual" type="box" pos="0 0 {-tissue_depth / 2:.6f}"
          size="0.035 0.035 {tissue_depth / 2:.6f}" rgba="0.85 0.6 0.55 1"/>
    <body name="entry" pos="0 0 0">
      <geom name="entry_mark" class="visual" type="cylinder" pos="0 0 0.0002" size="{mark_radius:.6f} 0.0002"
            rgba="0.1 0.7 0.15 1"/>
      <geom name="entry_dot" class="visual" type="cylinder" pos="0 0 0.0003" size="{mark_radius / 5:.6f} 0.0002"
            rgba="0.05 0.15 0.05 1"/>
    </body>"""
    return _HEADER.format(**fields) + tissue + _CARRIAGE.format(**fields) + _FOOTER.format(**fields)
