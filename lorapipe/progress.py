"""Progress lines for long steps: done/total, rate, ETA, and any extra values (e.g. loss)."""

import logging
import time

log = logging.getLogger("lorapipe")


class Progress:
    """Log `what: done/total (pct), rate, ETA` at most every `every` seconds, and at the end."""

    def __init__(self, what, total, unit="steps", scale=1.0, every=5.0):
        self.what, self.total, self.unit, self.scale, self.every = what, total, unit, scale, every
        self.start = self.last = time.time()
        self.reported = None

    def update(self, done, **extra):
        now = time.time()
        if done < self.total and now - self.last < self.every or done == self.reported == self.total:
            return
        self.last, self.reported = now, done
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate else float("nan")
        values = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
        log.info("%s: %s/%s %s (%.0f%%), %.1f %s/s, ETA %.0f s%s", self.what, _fmt(done / self.scale),
                 _fmt(self.total / self.scale), self.unit, 100 * done / max(self.total, 1),
                 rate / self.scale, self.unit, eta, values)


def _fmt(x):
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"
