"""A discrete PI controller with clamped output and anti-windup (pure).

The actuation u is the CPU limit of the best-effort class, in percent of one
host core; "released" is its maximum. The error e = target - measurement is
positive while the high class is short of its target, so u falls as e and its
integral grow:

    u = clamp(u_max - kp * e - ki * I,  u_min, u_max),   I = sum of e over periods

Anti-windup: when the output is clamped at its floor, the integral is set back
to what puts it exactly there, and when it is released (at its maximum) the
integral is emptied; so it never stores more than the actuator can deliver,
and the limit moves as soon as the high class's need changes. On engaging from
released, the integral is preset so the output starts at what the class uses
(a bumpless start: a limit above its use would change nothing for periods).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gains:
    kp: float = 0.4
    ki: float = 0.5
    u_min: float = 5.0
    u_max: float = 100.0


@dataclass(frozen=True)
class Step:
    measurement: float | None
    target: float
    error: float | None
    integral: float
    actuation: float
    note: str = ""


class PI:
    def __init__(self, gains: Gains, integral: float = 0.0):
        self.g = gains
        self.integral = integral
        self.u = gains.u_max

    def _output(self, error: float, integral: float) -> float:
        return self.g.u_max - self.g.kp * error - self.g.ki * integral

    def step(self, measurement: float | None, target: float, used: float | None = None,
             error: float | None = None) -> Step:
        """used: what the actuated class uses now (percent of a core), if known.
        error: positive while the high class is short of its target; by
        default target - measurement (a measure where higher is better)."""
        g = self.g
        if measurement is None:   # no sample this period: hold what is applied
            return Step(None, target, None, self.integral, self.u, "no measurement: actuation held")
        if error is None:
            error = target - measurement
        if self.u >= g.u_max and error > 0 and used is not None and used < g.u_max and g.ki > 0:
            # Engaging from released: a limit above what the class uses does nothing,
            # so start from its use (bumpless), not from u_max through a dead band.
            self.integral = (g.u_max - g.kp * error - max(g.u_min, used)) / g.ki - error
        self.integral += error
        raw = self._output(error, self.integral)
        note = ""
        if raw < g.u_min:
            # Anti-windup: keep only the integral that puts the output on its floor.
            self.integral = (g.u_max - g.kp * error - g.u_min) / g.ki if g.ki > 0 else 0.0
            note = "clamped: integral held (anti-windup)"
        elif raw >= g.u_max:
            self.integral = 0.0   # released: nothing stored to unwind later
            note = "released"
        self.u = min(g.u_max, max(g.u_min, raw))
        return Step(measurement, target, error, self.integral, round(self.u, 2), note)
