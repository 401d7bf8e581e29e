"""Sites of the reference fleet and their UTC offsets.

ASHRAE timestamps are the site's local standard time. The offsets below (hours east of UTC,
no daylight saving, as the data were recorded) convert them to UTC. A config may override
or extend them with ``sites: {<site>: {utc_offset_hours: ...}}``.
"""

from __future__ import annotations

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
