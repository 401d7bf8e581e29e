-- Daily aggregate per building and meter: the IoT Analytics design's "daily" dataset.
-- Days are UTC days of the reading's own timestamp. Each reading counts once (see
-- high_resolution.sql), negative values are dropped and site 0 electricity is converted from kBTU
-- to kWh, as the original pipeline's filter and math activities did. flagged counts the readings
-- the gateway's model flagged as anomalous (scored messages only).
WITH flat AS (
    SELECT
        m.site,
        m.kind,
        m.received_ms,
        element_at(r, 1) AS meter,
        CAST(element_at(r, 2) AS bigint) AS ts,
        CAST(element_at(r, 3) AS double) AS value,
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
),
kept AS (
    SELECT
        site,
        split_part(meter, ':', 1) AS building,
        split_part(meter, ':', 2) AS meter_type,
        date(from_unixtime(ts / 1000.0)) AS day,
        CASE WHEN site = '0' AND split_part(meter, ':', 2) = 'electricity'
            THEN value * 0.29307107 ELSE value END AS kwh,
        flag
    FROM ranked
    WHERE copy_no = 1 AND value >= 0
)
SELECT
    site,
    building,
    meter_type,
    day,
    count(*) AS readings,
    sum(kwh) AS kwh,
    avg(kwh) AS mean_kwh,
    min(kwh) AS min_kwh,
    max(kwh) AS max_kwh,
    count_if(flag) AS flagged
FROM kept
GROUP BY site, building, meter_type, day
ORDER BY building, meter_type, day
