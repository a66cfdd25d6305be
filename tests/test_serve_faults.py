"""The server under pressure and faults, on 2 ranks on 127.0.0.1: a full queue answers
429 and the next request still succeeds; Ctrl-C (SIGINT to rank 0) stops every rank;
a rank killed while serving ends the requests in flight with an error naming it,
/health says so (503), and every rank exits, rank 0 non-zero, within 30 s.
"""

from __future__ import annotations

import signal
import threading

import openai
import pytest

from tests.serving import MODEL, Server

pytestmark = pytest.mark.timeout(180)
LONG = {"ignore_eos": True}  # a stream that only ends when its client leaves


def open_stream(client, content="tell me everything"):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=3000,
        stream=True, extra_body=LONG)


def test_a_full_queue_answers_429_then_serves_and_ctrl_c_stops_every_rank():
    with Server(2, ["--max-batch", "1", "--max-queue", "1"]) as server:
        server.wait_ready()
        client = server.client()
        running = open_stream(client)  # headers come with its first token
        next(iter(running))
        waiting, err = [], []

        def queued():  # the second waits behind the first (one runs at a time)
            try:
                waiting.append(open_stream(server.client()))
            except Exception as e:  # reported below
                err.append(e)

        t = threading.Thread(target=queued)
        t.start()
        server.wait_health(lambda h: h["requests"]["waiting"] == 1)
        with pytest.raises(openai.RateLimitError, match="the server is busy") as e:
            client.chat.completions.create(model=MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": "me too"}])
        assert e.value.status_code == 429 and e.value.code == "queue_full"
        running.close()  # the first client leaves: the queued one starts
        t.join(30)
        assert waiting and not err, err
        waiting[0].close()
        r = client.chat.completions.create(model=MODEL, max_tokens=3,
                                           messages=[{"role": "user", "content": "now?"}])
        assert r.usage.completion_tokens >= 1

        # Ctrl-C with a request in flight: its client hears why, and every rank stops.
        in_flight = open_stream(client)
        next(iter(in_flight))
        server.signal(0, signal.SIGINT)
        with pytest.raises(openai.APIError, match="SIGINT"):
            for _ in in_flight:
                pass
        exits = server.wait_exits([0, 1], 15)
        assert set(exits) == {0, 1}, server.report()
        server.wait(15)
        assert server.exit_codes.get(0) == 128 + signal.SIGINT, server.report()
        assert "rank 0" in server.errors.get(1, [""])[0] and "SIGINT" in server.errors[1][0]
        assert not server.leftovers()


def test_a_rank_killed_while_serving_is_named_to_clients_and_in_health():
    with Server(2, ["--timeout", "10"]) as server:
        server.wait_ready()
        client = server.client()
        stream = open_stream(client)
        it = iter(stream)
        for _ in range(3):
            next(it)
        whole = []

        def not_streamed():
            try:
                whole.append(server.client().chat.completions.create(
                    model=MODEL, max_tokens=3000, extra_body=LONG,
                    messages=[{"role": "user", "content": "a long answer"}]))
            except Exception as e:  # expected: 503 naming the rank
                whole.append(e)

        t = threading.Thread(target=not_streamed)
        t.start()
        server.wait_health(lambda h: h["requests"]["running"] == 2)
        server.signal(1, signal.SIGKILL)
        with pytest.raises(openai.APIError, match=r"rank 1 \("):
            for _ in it:
                pass
        status, h = server.health()  # the server still answers, for a moment
        assert status == 503 and h["status"] == "lost" and h["lost_rank"] == 1, h
        assert "rank 1 (" in h["error"] and h["ranks"][1]["state"] == "lost"
        t.join(10)
        assert isinstance(whole[0], openai.APIStatusError) and whole[0].status_code == 503, whole
        assert "rank 1 (" in str(whole[0])
        exits = server.wait_exits([0], 30)
        assert 0 in exits and exits[0] < 30, server.report()
        server.wait(30)
        assert server.exit_codes.get(0) not in (None, 0), server.report()
        assert "rank 1 (" in server.errors[0][0], server.errors
        assert not server.leftovers()
