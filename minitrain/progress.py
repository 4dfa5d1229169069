"""Progress lines: how long something has left, as people read it."""


def duration(seconds):
    """1h05m, 4m07s."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
