"""Sites of the reference fleet and their UTC offsets.

ASHRAE timestamps are the site's local standard time. The offsets below (hours east of UTC,
no daylight saving, as the data were recorded) convert them to UTC. A config may override
or extend them with ``sites: {<site>: {utc_offset_hours: ...}}``. :func:`local_to_utc_ms` is the
one conversion of a site-local ``YYYY-MM-DD HH:MM:SS`` to UTC.
"""

from __future__ import annotations

from calendar import timegm

#: site id → (UTC offset in hours, country code for public holidays, city)
SITES: dict[str, tuple[float, str, str]] = {
    "0": (-5, "US", "Jacksonville"),
    "1": (0, "GB", "London"),
    "2": (-7, "US", "Phoenix"),
    "3": (-5, "US", "Philadelphia"),
    "4": (-8, "US", "San Francisco"),
    "5": (0, "GB", "Loughborough"),
    "6": (-5, "US", "Philadelphia"),
    "7": (-5, "CA", "Montreal"),
    "8": (-5, "US", "Jacksonville"),
    "9": (-6, "US", "San Antonio"),
    "10": (-8, "US", "Las Vegas"),
    "11": (-5, "CA", "Montreal"),
    "12": (0, "IE", "Dublin"),
    "13": (-6, "US", "Minneapolis"),
    "14": (-5, "US", "Philadelphia"),
    "15": (-5, "US", "Pittsburgh"),
}

UTC_OFFSET_HOURS: dict[str, float] = {site: v[0] for site, v in SITES.items()}
COUNTRY: dict[str, str] = {site: v[1] for site, v in SITES.items()}


_MS_PER_HOUR = 3_600_000


def local_to_utc_ms(text: str, offset_hours: float) -> int:
    """Convert a site-local ``YYYY-MM-DD HH:MM:SS`` to UTC epoch milliseconds.

    ``offset_hours`` is the site's offset east of UTC (:data:`UTC_OFFSET_HOURS`). Raises
    ValueError when ``text`` is not such a timestamp (a ``T`` may stand for the space). No
    strptime: a reader calls this once per distinct timestamp, and a backfill meets a lot of them.
    """
    if (
        len(text) != 19
        or text[4] != "-"
        or text[7] != "-"
        or text[10] not in " T"
        or text[13] != ":"
        or text[16] != ":"
    ):
        raise ValueError(text)
    parts = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    if not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(text)
    y, mo, d, h, mi, s = (int(p) for p in parts)
    # timegm does not check ranges (it happily takes month 13); check them here.
    if not (1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and h <= 23 and mi <= 59 and s <= 59):
        raise ValueError(text)
    return (timegm((y, mo, d, h, mi, s)) * 1000) - int(round(offset_hours * _MS_PER_HOUR))


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31
