"""The dashboard (emulator/dashboard.py): its aggregates over the emulated Athena, the health log,
the endpoints, and the page in headless Chromium (Debian's chromium and chromium-driver, selenium).

Known data: site 15, building 1433 (gateway gw-1) has electricity read every 15 minutes for six
hours, reading value h+1 in hour h (hourly sum 4(h+1) kWh, expected 4(h+1)-2), one reading flagged
in hour 4, model m-A scoring hours 0-2 and m-B from hour 3; a raw copy of a scored reading (kept
once, the scored copy) and a negative reading (dropped). Chilled water is raw, 20 kWh an hour.
Site 0's electricity is in kBTU: 100 of them are 29.307107 kWh.

Time ranges: site 3, building 42 has what ``gateway demo`` leaves (dashboard_helpers.year_and_today):
1 kWh every hour of 2016 and 5 kWh in each of the three hours before now.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from dashboard_helpers import (Y2016, FakeAthena, health_message, message, write_health, write_object,
                               year_and_today)
from emulator.dashboard import Consumption, Dashboard, HealthLog, RangeError, command, health_dir_for

T0 = 1717200000000  # 2024-06-01T00:00:00Z
H = 3_600_000
Q = 900_000
DAY = "2024-06-01"


def expected_electricity(h: int) -> tuple[float, float]:
    return 4.0 * (h + 1), 4.0 * (h + 1) - 2.0


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "cloud"
    scored = []
    for h in range(6):
        rows = []
        for q in range(4):
            v = float(h + 1)
            flag = h == 4 and q == 1
            rows.append(["1433:electricity", T0 + h * H + q * Q, v, v - 0.5, 0.9 if flag else 0.1, flag])
        scored.append(message("gw-1", "15", rows, "scored", "m-A" if h < 3 else "m-B", T0 + h * H + 4000))
    write_object(root, "scored", DAY, scored)
    raw = [message("gw-1", "15", [["1433:chilledwater", T0 + h * H, 20.0] for h in range(6)]
                   + [["1433:chilledwater", T0 + H + 60000, -5.0],   # negative: dropped
                      ["1433:electricity", T0, 999.0]],               # a raw copy: the scored one is kept
                   "raw", None, T0 + 9000),
           message("gw-2", "15", [["1434:electricity", T0 + h * H, 7.0] for h in range(3)], "raw", None, T0 + 9000),
           message("gw-3", "0", [["7:electricity", T0, 100.0]], "raw", None, T0 + 9000)]
    write_object(root, "raw", DAY, raw)
    health = root / "logs" / "metergateway" / "health"
    write_health(health, "gw-1", [
        health_message("gw-1", T0 + k * H, pending=p, lag=lag, ingest=i, delivered=d, autonomy=a, model=m)
        for k, (p, lag, i, d, a, m) in enumerate([
            (0, None, 3600.0, 3600.0, 210.5, "m-A"),
            (120, 30.0, 4000.0, 3000.0, 200.0, "m-A"),
            (40, 12.5, 3800.0, 4200.0, 205.0, "m-B"),
            (0, None, 3600.0, 3600.0, 210.5, "m-B")])])
    write_health(health, "gw-2", [health_message("gw-2", T0, pending=5, lag=2.0, ingest=10.0, delivered=10.0,
                                                 autonomy=999.0, model=None)])
    return root


# ------------------------------------------------------------------ aggregates, without a browser

def test_consumption_sums_each_reading_once_per_hour_in_kwh(root):
    c = Consumption(FakeAthena(root))
    got = c.consumption("15", "1433")
    assert got["bucket_ms"] == H
    series = {s["meter_type"]: s for s in got["series"]}
    assert sorted(series) == ["chilledwater", "electricity"]
    el = series["electricity"]
    assert [p[0] for p in el["points"]] == [T0 + h * H for h in range(6)]
    for h, p in enumerate(el["points"]):
        assert (p[1], p[2], p[3]) == (*expected_electricity(h), 4), h
        assert p[4] == (1 if h == 4 else 0)
    assert el["points"][4][5] == pytest.approx(0.9)
    assert el["switches"] == [{"ts": T0 + 3 * H, "from": "m-A", "to": "m-B"}]
    cw = series["chilledwater"]
    assert [(p[1], p[2]) for p in cw["points"]] == [(20.0, None)] * 6
    (site0,) = c.consumption("0", "7")["series"]
    assert site0["points"][0][1] == pytest.approx(100 * 0.29307107)
    whole_site = {s["meter_type"]: s for s in c.consumption("15", None)["series"]}
    assert whole_site["electricity"]["points"][0][1] == 4.0 + 7.0
    assert whole_site["electricity"]["things"] == ["gw-1", "gw-2"]


def test_buildings_lists_sites_buildings_meter_types_and_gateways(root):
    got = Consumption(FakeAthena(root)).buildings()
    assert [s["site"] for s in got["sites"]] == ["0", "15"]
    b1433, b1434 = got["sites"][1]["buildings"]
    assert b1433 == {"building": "1433", "meter_types": ["chilledwater", "electricity"], "things": ["gw-1"],
                     "readings": 30, "flagged": 1}
    assert b1434["things"] == ["gw-2"]


def test_one_query_serves_every_request_until_the_bucket_changes(root):
    athena = FakeAthena(root)
    c = Consumption(athena, refresh_s=0)
    c.buildings(), c.consumption("15", "1433"), c.consumption("0", None)
    assert athena.queries == 1
    write_object(root, "raw", DAY, [message("gw-3", "0", [["8:steam", T0, 3.0]], "raw", None, T0)])
    # the change is queried in the background; meanwhile the previous result is served
    assert [b["building"] for b in c.buildings()["sites"][0]["buildings"]] == ["7"]
    assert c.wait_refreshed(30)
    assert [b["building"] for b in c.buildings()["sites"][0]["buildings"]] == ["7", "8"]
    assert athena.queries == 2 and c.last_error is None


def test_health_log_is_read_incrementally_in_whole_lines(tmp_path):
    d = tmp_path / "health"
    path = write_health(d, "gw-9", [health_message("gw-9", T0, pending=1, lag=1.0, ingest=1.0, delivered=1.0,
                                                   autonomy=1.0, model="a")])
    hl = HealthLog(d)
    assert [p["pending"] for p in hl.health("gw-9")["points"]] == [1.0]
    second = json.dumps(health_message("gw-9", T0 + H, pending=2, lag=None, ingest=1.0, delivered=1.0,
                                       autonomy=1.0, model="b"))
    with path.open("a") as f:
        f.write(second[:40])  # a line being written: not read yet
    assert len(hl.health("gw-9")["points"]) == 1
    with path.open("a") as f:
        f.write(second[40:] + "\nnot json\n")
        # a CloudWatch Logs event whose message is the health message
        f.write(json.dumps({"timestamp": T0 + 2 * H, "message": json.dumps(health_message(
            "gw-9", T0 + 2 * H, pending=0, lag=None, ingest=1.0, delivered=1.0, autonomy=1.0, model="b"))}) + "\n")
    got = hl.health(None)
    assert [p["pending"] for p in got["points"]] == [1.0, 2.0, 0.0]
    assert got["points"][2]["lag_s"] == 0.0  # nothing pending: no lag
    assert got["switches"] == [{"ts": T0 + H, "from": "a", "to": "b"}]
    assert hl.bad_lines == 1


def test_endpoints_answer_errors_a_person_can_act_on(root, tmp_path):
    class Broken:
        def query(self, sql):
            raise RuntimeError("no such table: readings")

    with Dashboard(Broken(), tmp_path / "none") as board:
        def get(path):
            try:
                with urllib.request.urlopen(board.url + path, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        status, body = get("api/buildings")
        assert status == 503
        assert json.loads(body)["error"] == ("the Athena query for the consumption charts failed: "
                                             "RuntimeError: no such table: readings")
        assert get("api/consumption")[0] == 400
        assert get("nothing")[0] == 404
        assert get("static/../dashboard.py")[0] == 404
        status, body = get("static/app.js")
        assert status == 200 and b"createElementNS" in body
        assert json.loads(get("api/health")[1]) == {"things": [], "thing": "", "latest": {}, "points": [],
                                                    "models": [], "switches": []}


def test_health_dir_is_the_templates_log_group_under_logs(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    assert health_dir_for(tmp_path, repo / "cloud" / "analytics.yaml") == tmp_path / "logs" / "metergateway" / "health"


def test_command_needs_a_root():
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 2
    assert "Missing option '--root'" in result.output


# ------------------------------------------------------------------ the page, in headless Chromium

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def points(driver, chart_css: str, series: str, attr: str = "data-value") -> dict[int, float]:
    """The drawn points' ``data-ts`` and ``attr``, read in one script call (not one round trip each)."""
    got = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(c => [c.getAttribute('data-ts'), c.getAttribute(arguments[1])])",
        f"{chart_css} circle.pt[data-series='{series}']", attr)
    return {int(ts): float(v) for ts, v in got}


def test_page_plots_consumption_anomalies_model_switch_and_health(root, browser, tmp_path):
    with Dashboard(FakeAthena(root), root / "logs" / "metergateway" / "health") as board:
        browser.get(board.url)
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-consumption-ready") == "0/")
        Select(browser.find_element(By.ID, "site")).select_by_value("15")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-consumption-ready") == "15/")
        Select(browser.find_element(By.ID, "building")).select_by_value("1433")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-consumption-ready") == "15/1433")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-health-ready") == "gw-1")

        el = "svg[data-chart='consumption'][data-meter-type='electricity']"
        assert points(browser, el, "actual") == {T0 + h * H: expected_electricity(h)[0] for h in range(6)}
        assert points(browser, el, "expected") == {T0 + h * H: expected_electricity(h)[1] for h in range(6)}
        (anomaly,) = browser.find_elements(By.CSS_SELECTOR, f"{el} circle.anomaly")
        assert int(anomaly.get_attribute("data-ts")) == T0 + 4 * H
        assert anomaly.get_attribute("data-flagged") == "1"
        assert float(anomaly.get_attribute("data-value")) == 20.0
        assert float(anomaly.get_attribute("data-max-score")) == pytest.approx(0.9)
        (switch,) = browser.find_elements(By.CSS_SELECTOR, f"{el} line.model-switch")
        assert (int(switch.get_attribute("data-ts")), switch.get_attribute("data-from"),
                switch.get_attribute("data-to")) == (T0 + 3 * H, "m-A", "m-B")
        cw = "svg[data-chart='consumption'][data-meter-type='chilledwater']"
        assert points(browser, cw, "actual") == {T0 + h * H: 20.0 for h in range(6)}
        assert points(browser, cw, "expected") == {}
        assert browser.find_elements(By.CSS_SELECTOR, f"{cw} circle.anomaly") == []

        tiles = {t.get_attribute("data-field"): t.get_attribute("data-value")
                 for t in browser.find_elements(By.CSS_SELECTOR, "#health-latest .tile")}
        assert tiles == {"pending": "0", "lag_s": "0", "ingest_per_h": "3600", "delivered_per_h": "3600",
                         "autonomy_hours": "210.5", "model": "m-B", "connected": "true"}
        health = "svg[data-chart='health']"
        ts = [T0 + k * H for k in range(4)]
        assert points(browser, health, "pending") == dict(zip(ts, [0.0, 120.0, 40.0, 0.0]))
        assert points(browser, health, "lag_s") == dict(zip(ts, [0.0, 30.0, 12.5, 0.0]))
        assert points(browser, health, "ingest_per_h") == dict(zip(ts, [3600.0, 4000.0, 3800.0, 3600.0]))
        assert points(browser, health, "delivered_per_h") == dict(zip(ts, [3600.0, 3000.0, 4200.0, 3600.0]))
        assert points(browser, health, "autonomy_hours") == dict(zip(ts, [210.5, 200.0, 205.0, 210.5]))
        assert [r.get_attribute("data-model") for r in
                browser.find_elements(By.CSS_SELECTOR, f"{health} .model-band rect")] == ["m-A", "m-B"]
        assert {int(s.get_attribute("data-ts")) for s in
                browser.find_elements(By.CSS_SELECTOR, f"{health} line.model-switch")} == {T0 + 2 * H}

        Select(browser.find_element(By.ID, "thing")).select_by_value("gw-2")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-health-ready") == "gw-2")
        assert points(browser, health, "autonomy_hours") == {T0: 999.0}

        shot = tmp_path / "dashboard.png"
        Select(browser.find_element(By.ID, "thing")).select_by_value("gw-1")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-health-ready") == "gw-1")
        assert browser.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_health_the_rules_engine_logged_is_what_the_dashboard_reads(tmp_path):
    from emulator.rules.actions import Actions
    from emulator.rules.engine import RulesEngine

    repo = Path(__file__).resolve().parents[1]
    template = repo / "cloud" / "analytics.yaml"
    engine = RulesEngine([template], Actions(logs=tmp_path / "logs"), rules=["HealthRule"])
    for k, pending in enumerate([3, 0]):
        msg = health_message("gw-7", T0 + k * H, pending=pending, lag=4.0 if pending else None, ingest=60.0,
                             delivered=55.0, autonomy=120.0, model="m-C")
        del msg["received_ms"]  # the rule adds it (timestamp())
        engine.handle("dt/meters/gateway/gw-7/health", json.dumps(msg).encode(), client_id="gw-7")
    got = HealthLog(health_dir_for(tmp_path, template)).health("gw-7")
    assert [(p["ts"], p["pending"], p["lag_s"], p["model"]) for p in got["points"]] == [
        (T0, 3.0, 4.0, "m-C"), (T0 + H, 0.0, 0.0, "m-C")]


def test_the_page_reads_through_the_real_local_athena(root, browser):
    from emulator.athena import LocalAthena

    repo = Path(__file__).resolve().parents[1]
    athena = LocalAthena(root, template_path=repo / "cloud" / "analytics.yaml", bucket="metergateway-data")
    with Dashboard(athena, health_dir_for(root, repo / "cloud" / "analytics.yaml")) as board:
        browser.get(board.url + "?refresh=600")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#site option[value='15']"))
        Select(browser.find_element(By.ID, "site")).select_by_value("15")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-consumption-ready") == "15/")
        el = "svg[data-chart='consumption'][data-meter-type='electricity']"
        # the whole site: building 1433's electricity plus 1434's 7 kWh in hours 0-2
        assert points(browser, el, "actual") == {
            T0 + h * H: expected_electricity(h)[0] + (7.0 if h < 3 else 0.0) for h in range(6)}
        (anomaly,) = browser.find_elements(By.CSS_SELECTOR, f"{el} circle.anomaly")
        assert int(anomaly.get_attribute("data-ts")) == T0 + 4 * H
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-health-ready") == "gw-1")
        assert points(browser, "svg[data-chart='health']", "pending") == dict(
            zip([T0 + k * H for k in range(4)], [0.0, 120.0, 40.0, 0.0]))
    # each query's result is a CSV in the workgroup's output location, as Athena writes it
    assert list((root / "s3" / "metergateway-data" / "athena-results").glob("*.csv"))


def test_command_serves_an_emulation_root_until_ctrl_c(root):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from emulator.dashboard import command; command()",
                             "--root", str(root), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dashboard: http://127.0.0.1:") and line.endswith(" (Ctrl-C stops)\n"), line
        url = line.split()[1]
        with urllib.request.urlopen(url + "api/buildings", timeout=30) as r:
            assert [s["site"] for s in json.load(r)["sites"]] == ["0", "15"]
        with urllib.request.urlopen(url + "api/health?thing=gw-2", timeout=30) as r:
            assert [p["autonomy_hours"] for p in json.load(r)["points"]] == [999.0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ time ranges: 2016 and today

Y2017 = 1483228800000  # 2017-01-01T00:00:00Z
D = 24 * H


@pytest.fixture
def two_periods(tmp_path) -> tuple[Path, list[int]]:
    root = tmp_path / "cloud"
    n, today = year_and_today(root, int(time.time() * 1000))
    assert n == 366 * 24
    return root, today


def test_default_range_is_the_busiest_period_in_buckets_sized_to_it(two_periods):
    root, today = two_periods
    c = Consumption(FakeAthena(root))
    got = c.consumption("3", "42")
    p2016, p_today = f"period-{Y2016}", f"period-{today[0]}"
    assert [(r["id"], r["readings"]) for r in got["ranges"]] == [
        ("all", 366 * 24 + 3), (p2016, 366 * 24), (p_today, 3), ("24h", 3), ("7d", 3)]
    assert got["range"] == p2016 and (got["from_ms"], got["to_ms"]) == (Y2016, Y2017)
    assert got["bucket_ms"] == D  # a year: daily buckets
    (el,) = got["series"]
    assert [p[0] for p in el["points"]] == [Y2016 + d * D for d in range(366)]
    assert {p[1] for p in el["points"]} == {24.0}
    assert got["segments"] == [[Y2016, Y2017 - D]] and got["breaks"] == []
    assert c.consumption("3", "42", p2016) == got


def test_all_collapses_the_gap_and_short_ranges_are_hourly(two_periods):
    root, today = two_periods
    c = Consumption(FakeAthena(root))
    every = c.consumption("3", "42", "all")
    assert every["range"] == "all" and every["bucket_ms"] == D  # the span drawn is a year and 3 hours
    days = sorted({t - t % D for t in today})
    assert [p[0] for p in every["series"][0]["points"]] == [Y2016 + d * D for d in range(366)] + days
    assert every["segments"] == [[Y2016, Y2017 - D], [days[0], days[-1]]]
    assert every["breaks"] == [{"from_ms": Y2017 - D, "to_ms": days[0]}]
    for rid in (f"period-{today[0]}", "24h", "7d"):
        got = c.consumption("3", "42", rid)
        assert got["range"] == rid and got["bucket_ms"] == H, rid
        assert [(p[0], p[1]) for p in got["series"][0]["points"]] == [(t, 5.0) for t in today], rid
        assert got["series"][0]["models"] == [] and got["breaks"] == [], rid
    # a period named by any hour in it (it may have grown since), or gone: the period holding it, or the default
    assert c.consumption("3", "42", f"period-{Y2016 + 100 * D}")["range"] == f"period-{Y2016}"
    assert c.consumption("3", "42", "period-1")["range"] == f"period-{Y2016}"
    with pytest.raises(RangeError, match=r"^range='last year' is not a time range: give all, 24h, 7d or "
                                         r"period-<first hour in ms> \(the ids /api/consumption lists under "
                                         r"\"ranges\"\)$"):
        c.consumption("3", "42", "last year")


def test_a_refresh_computes_the_views_served_before_it_is_served(two_periods):
    root, today = two_periods
    c = Consumption(FakeAthena(root), refresh_s=0)
    c.consumption("3", "42"), c.consumption("3", "42", "24h")
    write_object(root, "raw", "2016-01-01", [message("gw-live", "3", [["42:electricity", today[-1] + 120_000, 2.0]],
                                                     "raw", None, today[-1])])
    snap = c.refresh()
    assert sorted(snap.selection("3", "42")._views) == ["24h", f"period-{Y2016}"]
    assert c.consumption("3", "42", "24h")["series"][0]["points"][-1][1] == 7.0


def test_a_single_period_offers_no_period_ranges(root):
    got = Consumption(FakeAthena(root)).consumption("15", "1433", "7d")
    assert [r["id"] for r in got["ranges"]] == ["all", "24h", "7d"]
    assert got["range"] == "7d" and len(got["series"][0]["points"]) == 6


def test_range_parameter_over_http(two_periods, tmp_path):
    root, today = two_periods
    with Dashboard(FakeAthena(root), tmp_path / "none") as board:
        with urllib.request.urlopen(board.url + "api/consumption?site=3&building=42&range=24h", timeout=30) as r:
            got = json.load(r)
        assert got["range"] == "24h" and [p[0] for p in got["series"][0]["points"]] == today
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(board.url + "api/consumption?site=3&range=yesterday", timeout=30)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"].startswith("range='yesterday' is not a time range")


def test_page_shows_the_busiest_period_and_switches_range(two_periods, browser, tmp_path):
    root, today = two_periods
    with Dashboard(FakeAthena(root), tmp_path / "none") as board:
        browser.get(board.url + "?refresh=600")
        wait = WebDriverWait(browser, 20)
        body = lambda d: d.find_element(By.TAG_NAME, "body")  # noqa: E731
        wait.until(lambda d: body(d).get_attribute("data-consumption-ready") == "3/")
        Select(browser.find_element(By.ID, "building")).select_by_value("42")
        wait.until(lambda d: body(d).get_attribute("data-consumption-ready") == "3/42")
        el = "svg[data-chart='consumption'][data-meter-type='electricity']"

        def shown():
            return (body(browser).get_attribute("data-consumption-range"),
                    int(browser.find_element(By.CSS_SELECTOR, el).get_attribute("data-bucket-ms")),
                    points(browser, el, "actual"))

        rid, bucket, pts = shown()
        assert rid == f"period-{Y2016}" and bucket == D
        assert len(pts) == 366 and all(Y2016 <= t < Y2017 for t in pts) and set(pts.values()) == {24.0}
        assert browser.find_elements(By.CSS_SELECTOR, f"{el} .axis-break") == []
        buttons = browser.find_elements(By.CSS_SELECTOR, "#range button")
        assert [b.get_attribute("data-range") for b in buttons] == [
            "all", f"period-{Y2016}", f"period-{today[0]}", "24h", "7d"]
        assert [b.text for b in buttons][:2] == ["all", "2016-01-01 – 2016-12-31"]
        (active,) = browser.find_elements(By.CSS_SELECTOR, "#range button.active")
        assert active.get_attribute("data-range") == f"period-{Y2016}"
        assert active.get_attribute("aria-pressed") == "true"

        browser.find_element(By.CSS_SELECTOR, "#range button[data-range='all']").click()
        wait.until(lambda d: body(d).get_attribute("data-consumption-range") == "all")
        rid, bucket, pts = shown()
        assert bucket == D and len(pts) == 366 + len({t - t % D for t in today})
        assert max(pts) >= today[0] - today[0] % D
        (gap,) = browser.find_elements(By.CSS_SELECTOR, f"{el} g.axis-break")
        assert int(gap.get_attribute("data-from-ts")) == Y2017 - D
        assert int(gap.get_attribute("data-to-ts")) == today[0] - today[0] % D
        # the break is drawn between the periods: 2016's last point left of it, today's right
        x = points(browser, el, "actual", "cx")
        rect = gap.find_element(By.TAG_NAME, "rect")
        left = float(rect.get_attribute("x"))
        assert x[Y2017 - D] < left < left + float(rect.get_attribute("width")) < x[max(x)]
        assert len(browser.find_elements(By.CSS_SELECTOR, f"{el} .series.actual polyline")) == 2
        shot = tmp_path / "dashboard-all.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        browser.find_element(By.CSS_SELECTOR, "#range button[data-range='24h']").click()
        wait.until(lambda d: body(d).get_attribute("data-consumption-range") == "24h")
        rid, bucket, pts = shown()
        assert bucket == H and pts == {t: 5.0 for t in today}
        assert browser.find_elements(By.CSS_SELECTOR, f"{el} .axis-break") == []
