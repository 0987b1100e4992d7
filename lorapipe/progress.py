"""Progress lines for long steps: done/total, rate, ETA, and any extra values (e.g. loss)."""

import logging
import time

log = logging.getLogger("lorapipe")


class Progress:
    """Log `what: done/total (pct), rate, ETA` at most every `every` seconds, and at the end.

    The rate counts from when the object is made, or with `from_first_update` from the first update
    on (its time and count): a finetune's first logged step comes after the graph compile, and after a
    resume it is not step 1, so counting from the start would fold the compile into the rate and the
    resumed steps into the count. Until a second update there is then no rate to show."""

    def __init__(self, what, total, unit="steps", scale=1.0, every=5.0, from_first_update=False):
        self.what, self.total, self.unit, self.scale, self.every = what, total, unit, scale, every
        self.start = self.last = time.time()
        self.origin = None if from_first_update else (self.start, 0)  # (time, done) the rate counts from
        self.reported = None

    def update(self, done, **extra):
        now = time.time()
        if self.origin is None:
            self.origin = (now, done)
        if done < self.total and now - self.last < self.every or done == self.reported == self.total:
            return
        self.last, self.reported = now, done
        since, done_before = self.origin
        rate = (done - done_before) / (now - since) if now > since and done > done_before else None
        pace = f", {rate / self.scale:.1f} {self.unit}/s, ETA {(self.total - done) / rate:.0f} s" if rate else ""
        values = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
        log.info("%s: %s/%s %s (%.0f%%)%s%s", self.what, _fmt(done / self.scale), _fmt(self.total / self.scale),
                 self.unit, 100 * done / max(self.total, 1), pace, values)


def _fmt(x):
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"
