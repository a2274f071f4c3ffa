"""The console's pages over HTTP: each page, paging, escaping, the token, the live log."""

from __future__ import annotations

import html
import re
import socket
import time
from urllib.parse import quote

import markupsafe
import pytest

from tests.console.conftest import (
    CORRELATION,
    EVIL_TAG,
    ITEMS,
    LONG,
    ROOM,
    SCRIPT,
    TOKEN,
    Demo,
    Server,
    append_now,
    event,
    make_broker,
    request,
    serve,
)


def test_home_redirects_to_the_streams(console: Server) -> None:
    status, _, headers = console.get("/")
    assert status == 302
    assert headers["location"] == "/s/0/streams"


def test_every_page_answers(console: Server, demo: Demo) -> None:
    pages = [
        "/s/0/streams",
        f"/s/0/stream/{demo.account_stream}",
        f"/s/0/state/{demo.account_stream}",
        "/s/0/state/long-1?version=3",
        "/s/0/log",
        "/s/0/projections",
        f"/s/0/trace/{CORRELATION}",
        "/s/0/trace",
        "/dead-letters",
        "/dead-letters/dl-1",
        "/groups",
    ]
    for page in pages:
        status, body, headers = console.get(page)
        assert status == 200, (page, body[:500])
        assert "<title>" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "http://" not in re.sub(r'href="http://127\.0\.0\.1[^"]*"', "", body), page


def test_no_asset_comes_from_elsewhere(console: Server) -> None:
    _, body, _ = console.get("/s/0/log")
    for url in re.findall(r'(?:src|href)="([^"]+)"', body):
        assert url.startswith(("/", "#", "?", "data:")), url
    status, script, _ = console.get("/static/console.js")
    assert status == 200 and "EventSource" in script
    assert "innerHTML" not in script  # data is only ever set as text


def test_streams_page_by_id_cursor(console: Server) -> None:
    _, body, _ = console.get("/s/0/streams?q=item-")
    shown = re.findall(r'/s/0/stream/(item-\d+)"', body)
    assert shown == [f"item-{n:03}" for n in range(50)]
    after = re.search(r'href="\?q=item-&amp;after=(item-\d+)"', body)
    assert after is not None and after.group(1) == "item-049"
    _, body, _ = console.get("/s/0/streams?q=item-&after=item-049")
    shown = re.findall(r'/s/0/stream/(item-\d+)"', body)
    assert shown == [f"item-{n:03}" for n in range(50, ITEMS)]
    assert "next page →</a>" not in body


def test_search_is_a_prefix_search(console: Server) -> None:
    _, body, _ = console.get("/s/0/streams?q=order")
    assert re.findall(r'/s/0/stream/([^"?]+)"', body) == ["order-42"]
    _, body, _ = console.get("/s/0/streams?q=nothing-like-this")
    assert "No streams" in body


def search(text: str) -> str:
    return "/s/0/streams?q=" + quote(text, safe="")


def tagged_rows(body: str) -> list[tuple[int, str]]:
    """The (position, stream) rows of a tag search's table."""
    found = re.findall(
        r'<td class="num">(\d+)</td>\s*<td><a class="rowlink" href="/s/0/stream/([^"?]+)', body
    )
    return [(int(position), stream) for position, stream in found]


def test_tag_search_finds_the_events_of_every_stream(console: Server) -> None:
    status, body, _ = console.get(search("tag:course:c1"))
    assert status == 200, body[:500]
    assert "Events tagged <code>course:c1</code>" in body
    rows = tagged_rows(body)
    assert [stream for _, stream in rows] == ["student-7", "student-8"]
    assert rows == sorted(rows)  # in the order they were stored
    assert "course:c2" not in body
    # each row shows its tags, each a link to the events carrying it
    assert body.count(f'href="{search("tag:student:7")}"') == 1
    room = search('tag:"' + ROOM + '"')
    assert f'href="{room}"' in body


def test_tag_search_terms_must_all_hold(console: Server) -> None:
    _, body, _ = console.get(search("tag:course:c1 tag:student:7"))
    assert [stream for _, stream in tagged_rows(body)] == ["student-7"]
    assert "<code>course:c1</code> and <code>student:7</code>" in body
    _, body, _ = console.get(search("tag:course:c2  tag:student:8"))
    assert tagged_rows(body) == [] and "No event carries all these tags" in body
    _, body, _ = console.get(search(f'tag:"{ROOM}"'))  # a tag holding a space, quoted
    assert [stream for _, stream in tagged_rows(body)] == ["student-7", "student-7", "student-8"]


def test_tag_search_pages_by_position(console: Server) -> None:
    _, body, _ = console.get(search("tag:kind:item"))
    rows = tagged_rows(body)
    assert [stream for _, stream in rows] == [f"item-{n:03}" for n in range(50)]
    after = rows[-1][0]
    assert f'href="?q=tag%3Akind%3Aitem&amp;after={after}"' in body
    _, body, _ = console.get(search("tag:kind:item") + f"&after={after}")
    assert [stream for _, stream in tagged_rows(body)] == [f"item-{n:03}" for n in range(50, ITEMS)]
    assert "next page →</a>" not in body and 'href="?q=tag%3Akind%3Aitem"' in body


def test_a_plain_search_that_is_a_tag_offers_its_events(console: Server) -> None:
    _, body, _ = console.get(search("course:c1"))
    assert "No streams" in body  # no stream id starts with it, but events carry it
    assert 'href="?q=tag%3Acourse%3Ac1"' in body and "show the events tagged" in body
    _, body, _ = console.get(search("order"))
    assert "show the events tagged" not in body


def test_a_bad_tag_search_is_400(console: Server) -> None:
    for text in ("tag:", "tag:course:c1 order", "tag:a nope"):
        status, body, _ = console.get(search(text))
        assert status == 400, text
        assert "tag:" in body


def test_events_show_their_tags(console: Server) -> None:
    _, body, _ = console.get("/s/0/stream/student-7")
    assert "<dt>tags</dt>" in body
    for tag in ("course:c1", "course:c2", "student:7"):
        assert f'<a class="badge tag" href="{search("tag:" + tag)}"' in body
        assert f"<code>{tag}</code>" in body
    _, body, _ = console.get("/s/0/stream/order-42")  # an untagged event says so
    assert re.search(r"<dt>tags</dt><dd>\s*<span class=\"muted\">none</span>", body)
    _, body, _ = console.get(search("tag:course:c2"))
    [(position, _)] = tagged_rows(body)
    _, body, _ = console.get(f"/s/0/log?before={position + 1}")  # and in the log
    assert '<th scope="col">tags</th>' in body
    assert f'href="{search("tag:course:c2")}"' in body


def test_a_tag_is_text_never_markup(console: Server) -> None:
    found = search('tag:"' + EVIL_TAG.replace('"', '\\"') + '"')  # quoted: it holds spaces
    for page in ("/s/0/stream/customer-evil", found, "/s/0/log?before=999999"):
        _, body, _ = console.get(page)
        assert "<img src=x" not in body, page
    _, body, _ = console.get("/s/0/stream/customer-evil")
    assert f"<code>{markupsafe.escape(EVIL_TAG)}</code>" in body
    assert f'href="{found}"' in body  # its link finds it again
    _, body, _ = console.get(found)
    assert [stream for _, stream in tagged_rows(body)] == ["customer-evil"]


def test_stream_pages_by_version(console: Server) -> None:
    _, body, _ = console.get("/s/0/stream/long-1")  # the newest page by default
    versions = [int(v) for v in re.findall(r'id="v(\d+)"', body)]
    assert versions == list(range(LONG - 49, LONG + 1))
    _, body, _ = console.get("/s/0/stream/long-1?from=1")
    assert [int(v) for v in re.findall(r'id="v(\d+)"', body)] == list(range(1, 51))
    assert 'href="?from=51"' in body


def test_stream_shows_data_and_metadata(console: Server) -> None:
    _, body, _ = console.get("/s/0/stream/payment-42")
    assert "payment.requested" in body and "&#34;amount&#34;: 12000" in body
    assert f'href="/s/0/trace/{CORRELATION}"' in body
    assert "service payment" in body  # a header


def test_unknown_stream_is_404(console: Server) -> None:
    status, body, _ = console.get("/s/0/stream/no-such-stream")
    assert status == 404 and "no stream" in body
    assert console.get("/s/7/streams")[0] == 404


def test_event_data_is_text_never_markup(console: Server) -> None:
    for page in ("/s/0/stream/customer-evil", "/s/0/log?before=999999", "/s/0/state/customer-evil"):
        _, body, _ = console.get(page)
        assert "<script>window.__pwned" not in body, page
        assert "<img src=x" not in body, page
    _, body, _ = console.get("/s/0/stream/customer-evil")
    assert html.escape(SCRIPT, quote=True) in body
    _, body, _ = console.get("/dead-letters/dl-99")
    assert "<script>window.__pwned" not in body and "&lt;script&gt;" in body


def test_log_pages_by_position(console: Server) -> None:
    _, body, _ = console.get("/s/0/log?before=101")
    positions = [int(p) for p in re.findall(r'<td class="num">(\d+)</td>\s*<td><a', body)]
    assert positions == list(range(100, 50, -1))
    assert 'href="?before=51"' in body
    assert "data-live" not in body  # only the newest page follows the log


def test_time_travel_generic(console: Server) -> None:
    _, body, _ = console.get("/s/0/state/long-1?version=4")
    assert "at version 4" in body and "generic view" in body
    assert "&#34;n&#34;: 3" in body  # the fold of the data up to v4
    assert re.search(r"<code>n</code>: <code>2</code> → <code>3</code>", body)


def test_time_travel_with_the_aggregate_class(console: Server, demo: Demo) -> None:
    _, body, _ = console.get(f"/s/0/state/{demo.account_stream}?version=2")
    assert "<code>Account</code>" in body
    assert "&#34;balance&#34;: 100" in body
    _, body, _ = console.get(f"/s/0/state/{demo.account_stream}")
    assert "&#34;balance&#34;: 120" in body


def test_projections_page(console: Server) -> None:
    _, body, _ = console.get("/s/0/projections")
    assert "ledger_balances" in body
    assert 'action="/s/0/projections/ledger_balances/rebuild"' in body
    assert '<svg class="chart"' in body


def test_trace_page_draws_the_causation_tree(console: Server, demo: Demo) -> None:
    _, body, _ = console.get(f"/s/0/trace/{CORRELATION}")
    types = re.findall(r'<strong class="type">([^<]+)</strong>', body)
    assert types == [
        "order.placed",
        "payment.requested",
        "payment.captured",
        "order.paid",
        "email.sent",
    ]
    assert body.count('class="depth-0"') == 1 and body.count('class="depth-2"') == 2
    assert "caused by <code>cmd-place-42</code> (not a stored event)" in body
    assert "<circle" in body
    status, _, headers = console.get(f"/s/0/trace?id={quote(CORRELATION)}")
    assert status in (302, 307) and headers["location"].endswith(f"/trace/{CORRELATION}")


def test_replay_needs_the_token(console: Server) -> None:
    status, body, _ = console.post("/dead-letters/dl-2/replay")
    assert status == 403 and "token" in body
    status, _, _ = console.post("/dead-letters/dl-2/replay", {"token": "wrong"})
    assert status == 403
    status, _, _ = console.post("/dead-letters/dl-2/replay", **{"X-Tidings-Token": "x" + TOKEN})
    assert status == 403
    assert "dl-2" in console.get("/dead-letters")[1]
    status, _, headers = console.post("/dead-letters/dl-2/replay", {"token": TOKEN})
    assert status == 303 and headers["location"] == "/dead-letters?replayed=dl-2"
    _, body, _ = console.get("/dead-letters?replayed=dl-2")
    assert "Replayed dead letter" in body and '/dead-letters/dl-2"' not in body
    status, _, _ = console.post("/dead-letters/dl-3/replay", **{"X-Tidings-Token": TOKEN})
    assert status == 303
    assert console.post("/dead-letters/nope/replay", {"token": TOKEN})[0] == 404


def test_rebuild_needs_the_token_and_runs(console: Server) -> None:
    assert console.post("/s/0/projections/ledger_balances/rebuild")[0] == 403
    status, _, _ = console.post("/s/0/projections/ledger_balances/rebuild", {"token": TOKEN})
    assert status == 303
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = console.get("/s/0/projections")[1]
        if "rebuilt to position" in body:
            break
        time.sleep(0.1)
    assert "rebuilt to position" in body


def test_groups_come_from_dead_letters_and_say_what_is_missing(console: Server) -> None:
    _, body, _ = console.get("/groups")
    assert "<td>orders</td>" in body and ">email</a>" in body
    assert "no common way to list" in body


def test_requests_must_name_a_local_host(console: Server) -> None:
    status, _, _ = console.get("/s/0/streams", Host="evil.example")
    assert status == 400


def test_live_log_streams_new_events(console: Server, demo: Demo) -> None:
    _, body, _ = console.get("/s/0/log")
    live = re.search(r'data-live="([^"]+)"', body)
    assert live is not None
    sock = socket.create_connection(("127.0.0.1", console.port), timeout=10)
    with sock:
        path = html.unescape(live.group(1))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        deadline = time.monotonic() + 10
        while b"retry:" not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
        assert b"text/event-stream" in received
        append_now(demo.url, "live-1", event("live.ping", text=SCRIPT))
        while b'"live.ping"' not in received and time.monotonic() < deadline:
            received += sock.recv(4096)
    text = received.decode()
    assert "event: append" in text and '"stream_id": "live-1"' in text
    assert SCRIPT.replace('"', '\\"') in text  # JSON text: the page sets it with textContent


def test_without_app_rebuild_is_disabled_with_the_reason(demo: Demo) -> None:
    server = serve(demo, with_app=False, broker=make_broker(1))
    try:
        _, body, _ = server.get("/s/0/projections")
        assert "<button disabled" in body and "--app MODULE" in body
        assert server.post("/s/0/projections/ledger_balances/rebuild", {"token": TOKEN})[0] == 409
        _, body, _ = server.get(f"/s/0/state/{demo_stream(body, server)}")
        assert "generic view" in body
    finally:
        server.stop()


def demo_stream(_: str, server: Server) -> str:
    _, body, _ = server.get("/s/0/streams?q=account-")
    found = re.search(r'/s/0/stream/(account-[^"]+)"', body)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize("path", ["/s/0/log?before=x", "/s/0/stream/long-1?from=-"])
def test_bad_numbers_are_400(console: Server, path: str) -> None:
    assert request(console.url + path)[0] == 400


def test_metrics_are_prometheus_text_with_projection_lag(console: Server) -> None:
    status, body, headers = console.get("/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE tidings_projection_lag_events gauge" in body
    assert "tidings_projection_lag_events{" in body  # the demo store's projections
