-- High-resolution export: every reading once, flattened (one row per reading), in kWh.
-- The IoT Analytics design's "highres" dataset, over the readings table: raw and scored
-- messages alike (a scored reading carries expected, score and flag; a raw one NULLs).
-- A replay after a crash can deliver a reading twice: (meter, ts) is its key, and the scored copy,
-- then the first received, is kept. As in the original pipeline, negative values are dropped and
-- site 0 electricity, recorded in kBTU, is converted to kWh.
-- Add "AND m.dt >= 'YYYY-MM-DD'" (the day the cloud received the message) to scan less.
WITH flat AS (
    SELECT
        m.site,
        m.thing,
        m.kind,
        m.model,
        m.received_ms,
        element_at(r, 1) AS meter,
        CAST(element_at(r, 2) AS bigint) AS ts,
        CAST(element_at(r, 3) AS double) AS value,
        CAST(element_at(r, 4) AS double) AS expected,
        CAST(element_at(r, 5) AS double) AS score,
        element_at(r, 6) IN ('true', '1') AS flag
    FROM readings AS m
    CROSS JOIN UNNEST(m.readings) AS t (r)
    WHERE m.kind IN ('raw', 'scored')
),
ranked AS (
    SELECT
        flat.*,
        row_number() OVER (PARTITION BY meter, ts ORDER BY kind DESC, received_ms) AS copy_no
    FROM flat
)
SELECT
    site,
    split_part(meter, ':', 1) AS building,
    split_part(meter, ':', 2) AS meter_type,
    from_unixtime(ts / 1000.0) AS reading_time,
    ts,
    CASE WHEN site = '0' AND split_part(meter, ':', 2) = 'electricity'
        THEN value * 0.29307107 ELSE value END AS kwh,
    expected,
    score,
    flag,
    model,
    thing
FROM ranked
WHERE copy_no = 1 AND value >= 0
ORDER BY building, meter_type, ts
