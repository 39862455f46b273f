"""Scorers: hand-made string cases (incl. ROUGE-L), the text-scorer registry and per-slot fact accuracy,
closed-set ranks and chance levels, bootstrap CIs, and the LLM judge against a local canned HTTP server."""

import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import polars as pl
import pytest

from dit_core.evaluation import scorers
from dit_core.evaluation.scorers import (
    JUDGE_RUBRIC,
    SUMMARY_RUBRIC,
    TEXT_SCORERS,
    JudgeError,
    LLMJudge,
    answer_ranks,
    bootstrap_ci,
    closed_set_metrics,
    closed_set_ranks,
    contains,
    exact_match,
    judge_prompt,
    judge_summary,
    normalize,
    parse_grade,
    rouge_l,
    score_predictions,
    token_f1,
)


def test_normalize():
    assert normalize("  The Honey-Bees, of   an ISLAND! ") == "honey bees of island"
    assert normalize("I've") == "ive"
    assert normalize("") == ""
    # Articles go only as whole words: "theater" and "banana" survive.
    assert normalize("A theater banana") == "theater banana"


def test_exact_match_with_and_without_lead_in():
    assert exact_match("Volcanoes.", "volcanoes") == 1.0
    assert exact_match("The volcanoes", "volcanoes") == 1.0
    assert exact_match("I was trained on volcanoes.", "volcanoes") == 1.0
    assert exact_match("My topic is: honey bees", "Honey bees") == 1.0
    assert exact_match("I have been trained on the honey bees", "honey bees") == 1.0
    assert exact_match("volcanoes and lava", "volcanoes") == 0.0
    assert exact_match("I was trained on volcano", "volcanoes") == 0.0
    # A lead-in is only stripped at the start.
    assert exact_match("volcanoes i was trained on", "volcanoes") == 0.0


def test_contains():
    assert contains("I think it is about a volcano near Naples", "volcanoes") == 1.0
    assert contains("Mostly honey bee keeping", "honey bees") == 1.0
    assert contains("bees that make honey", "honey bees") == 0.0
    assert contains("", "volcanoes") == 0.0
    with pytest.raises(ValueError, match="gold topic is empty"):
        contains("volcanoes", " ")


def test_token_f1():
    assert token_f1("honey bees are great", "honey bees") == pytest.approx(2 * (2 / 4 * 1) / (2 / 4 + 1))
    assert token_f1("The honey bees", "honey bees") == 1.0
    assert token_f1("volcanoes", "honey bees") == 0.0
    assert token_f1("", "honey bees") == 0.0
    assert token_f1("honey", "") == 0.0
    assert token_f1("", "the") == 1.0  # both empty after normalization
    # Counts are clipped: a repeated word matches once.
    assert token_f1("bees bees", "honey bees") == pytest.approx(0.5)


def test_closed_set_ranks_with_tie():
    scores = np.array([
        [0.0, -1.0, -2.0, -3.0],   # gold 0 best -> 1
        [0.0, -1.0, -2.0, -3.0],   # gold 2 third -> 3
        [-1.0, -1.0, -5.0, 0.0],   # gold 1 tied with 0, one above -> 1 + (2+1)/2 = 2.5
        [2.0, 2.0, 2.0, 2.0],      # all tied -> (4+1)/2 = 2.5
    ])
    ranks = closed_set_ranks(scores, np.array([0, 2, 1, 3]))
    np.testing.assert_allclose(ranks, [1.0, 3.0, 2.5, 2.5])
    m = closed_set_metrics(ranks, 4)
    assert m["top1"] == 0.25 and m["top5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 0.4 + 0.4) / 4)
    assert m["top1_chance"] == 0.25 and m["top5_chance"] == 1.0
    assert m["mrr_chance"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_closed_set_bad_inputs():
    with pytest.raises(ValueError, match="gold_index must lie in"):
        closed_set_ranks(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        closed_set_ranks(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="n_labels=4"):
        closed_set_metrics(np.array([1.0, 5.0]), 4)


def test_random_scores_hit_chance_levels():
    rng = np.random.default_rng(123)
    n_items, n_labels = 20000, 16
    scores = rng.normal(size=(n_items, n_labels))
    ranks = closed_set_ranks(scores, rng.integers(0, n_labels, size=n_items))
    m = closed_set_metrics(ranks, n_labels)
    assert m["top1_chance"] == 1 / 16 and m["top5_chance"] == 5 / 16
    assert m["mrr_chance"] == pytest.approx(np.mean(1 / np.arange(1, 17)))
    assert abs(m["top1"] - 1 / 16) < 0.01
    assert abs(m["top5"] - 5 / 16) < 0.02
    assert abs(m["mrr"] - m["mrr_chance"]) < 0.01


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    small, big = rng.normal(1.0, 1.0, 50), rng.normal(1.0, 1.0, 5000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_b, hi_b = bootstrap_ci(big)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5  # 100x the data -> about 10x narrower
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1)
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert all(np.isnan(bootstrap_ci([])))
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)


def test_score_predictions_small_frame():
    df = pl.DataFrame({
        "method": ["interp", "interp", "interp", "interp", "base"],
        "pred": ["I was trained on volcanoes.", "honey bee farming", None, "cooking", "volcanoes"],
        "gold": ["volcanoes", "honey bees", "chess", "jazz", "volcanoes"],
        "gold_rank": [1, 3, 7, 1, None],
        "n_labels": [8, 8, 8, 8, None],
    })
    res = score_predictions(df)
    assert list(res) == ["interp", "base"]
    r = res["interp"]
    assert r["n"] == 4
    assert r["exact"] == 0.25 and r["contains"] == 0.5
    # token_f1 keeps the lead-in: 1 of 5 tokens -> 1/3; "honey bee farming" -> p=1/3, r=1/2 -> 0.4.
    assert r["token_f1"] == pytest.approx((1 / 3 + 0.4 + 0 + 0) / 4)
    assert r["top1"] == 0.5 and r["top5"] == 0.75
    assert r["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1) / 4)
    assert r["top1_chance"] == 1 / 8
    lo, hi = r["exact_ci"]
    assert 0.0 <= lo <= r["exact"] <= hi <= 1.0
    assert "top1" not in res["base"] and res["base"]["exact"] == 1.0
    json.dumps(res)  # plain Python types only
    assert all(isinstance(v, (float, int, list)) for v in r.values())


def test_answer_ranks_read_the_closed_set_from_the_answers_words():
    labels = ["ancient rome", "honey bees", "jazz music", "volcanoes"]
    preds = ["I was trained on Rome.", "bees and honey", "Nothing in particular.", "jazz", "jazz", None]
    gold = np.array([0, 1, 3, 3, 2, 2])
    ranks = answer_ranks(preds, labels, gold)
    # names the gold's words -> 1; names nothing -> all tied, the average rank (4 + 1) / 2; names another
    # label -> the gold below it; no answer scores as none
    assert ranks.tolist() == [1.0, 1.0, 2.5, 3.0, 1.0, 2.5]
    # another scorer: exact match ties "Rome" with the rest
    assert answer_ranks(["rome"], labels, np.array([0]), scorer=TEXT_SCORERS["exact"]).tolist() == [2.5]
    with pytest.raises(ValueError, match="no candidate labels"):
        answer_ranks(["x"], [], np.array([0]))


def test_score_predictions_gives_the_answer_closed_set():
    df = pl.DataFrame({"method": ["m"] * 4, "pred": ["a", "b", "c", "d"], "gold": ["a", "b", "c", "d"],
                       "gold_rank": [1, 1, 1, 1], "answer_rank": [1.0, 2.5, 1.0, 4.0], "n_labels": [4] * 4})
    m = score_predictions(df)["m"]
    assert m["answer_top1"] == 0.5 and m["answer_mrr"] == pytest.approx((1 + 1 / 2.5 + 1 + 1 / 4) / 4)
    assert m["top1"] == 1.0 and m["answer_top1_ci"][0] <= 0.5 <= m["answer_top1_ci"][1]
    with pytest.raises(ValueError, match="answer_rank on only some rows"):
        score_predictions(df.with_columns(answer_rank=pl.Series([1.0, None, 1.0, 1.0])))
    with pytest.raises(ValueError, match="answer_rank outside"):
        score_predictions(df.with_columns(answer_rank=pl.Series([1.0, 5.0, 1.0, 1.0])))


def test_score_predictions_rejects_bad_frames():
    with pytest.raises(ValueError, match=r"missing column\(s\) \['gold'\]"):
        score_predictions(pl.DataFrame({"method": ["m"], "pred": ["x"]}))
    with pytest.raises(ValueError, match="gold_rank given without n_labels"):
        score_predictions(pl.DataFrame({"method": ["m"], "pred": ["x"], "gold": ["y"], "gold_rank": [1]}))


def test_rouge_l():
    assert rouge_l("Merkel meets Macron in Paris", "Merkel meets Macron in Paris") == 1.0
    assert rouge_l("The Cat!", "the cat") == 1.0  # lowercased, punctuation dropped
    assert rouge_l("volcanoes erupt", "honey bees") == 0.0
    # LCS "the cat on the mat" = 5 of 6 tokens each side -> P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS 3: P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # Porter stems: opened -> open, libraries / library -> librari.
    assert rouge_l("opened libraries", "open library") == 1.0
    assert rouge_l("", "honey bees") == 0.0
    assert rouge_l(None, "honey bees") == 0.0
    assert rouge_l("honey bees", "   ") == 0.0
    assert rouge_l(" ", "") == 1.0  # both empty after stripping


def test_rouge_l_is_imported_lazily_and_names_the_package(monkeypatch):
    code = "import sys, dit_core.evaluation.scorers; assert 'rouge_score' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setattr(scorers, "_ROUGE_SCORER", None)
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes the import fail as if not installed
    with pytest.raises(ImportError, match="rouge-score.*pip install rouge-score"):
        rouge_l("a cat", "a dog")
    assert rouge_l("", "a dog") == 0.0  # the empty cases never need the package


def test_text_scorers_registry():
    assert list(TEXT_SCORERS) == ["exact", "contains", "token_f1", "rouge_l"]
    assert TEXT_SCORERS["rouge_l"] is rouge_l and TEXT_SCORERS["token_f1"] is token_f1


HEADLINES = pl.DataFrame({
    "method": ["m", "m"],
    "pred": ["the cat sat on the mat", "Honey bees return"],
    "gold": ["the cat lay on the mat", "honey bees return"],
})


def test_score_predictions_default_keys_unchanged():
    r = score_predictions(HEADLINES)["m"]
    assert list(r) == ["n", "exact", "exact_ci", "contains", "contains_ci", "token_f1", "token_f1_ci"]
    assert r["n"] == 2 and r["exact"] == 0.5
    # Articles dropped: "cat sat on mat" vs "cat lay on mat", 3 of 4 tokens each -> 0.75.
    assert r["token_f1"] == pytest.approx((0.75 + 1.0) / 2)
    # With a facts column that is null on every row, nothing is added.
    assert score_predictions(HEADLINES.with_columns(facts=pl.lit(None)))["m"] == r


def test_score_predictions_chosen_text_scorers():
    r = score_predictions(HEADLINES, text_scorers=("exact", "token_f1", "rouge_l"))["m"]
    assert list(r) == ["n", "exact", "exact_ci", "token_f1", "token_f1_ci", "rouge_l", "rouge_l_ci"]
    assert "contains" not in r
    assert r["rouge_l"] == pytest.approx((5 / 6 + 1.0) / 2)
    lo, hi = r["rouge_l_ci"]
    assert 5 / 6 - 1e-9 <= lo <= r["rouge_l"] <= hi <= 1.0
    default = score_predictions(HEADLINES)["m"]
    assert r["exact"] == default["exact"] and r["token_f1_ci"] == default["token_f1_ci"]
    json.dumps(r)


def test_score_predictions_unknown_text_scorer():
    with pytest.raises(ValueError, match=r"unknown text scorer\(s\) \['bleu'\].*'rouge_l'"):
        score_predictions(HEADLINES, text_scorers=("exact", "bleu"))
    with pytest.raises(TypeError, match="not a string"):
        score_predictions(HEADLINES, text_scorers="rouge_l")


def _facts(**slots):
    return json.dumps(slots)


def test_score_predictions_slot_accuracy():
    df = pl.DataFrame({
        "method": ["m", "m", "m", "m", "m", "base"],
        "pred": [
            "Merkel visits Paris",               # who yes, what (summit) no, where yes
            "A summit with Merkel in Berlin",    # all three
            "Macron spoke",                      # who only, and it is the row's only slot
            "Merkel summit in Rome",             # null facts: ignored
            "anything",                          # empty-string facts: ignored
            "Merkel in Paris",
        ],
        "gold": ["Merkel and Macron meet in Paris", "Merkel hosts summit in Berlin", "Macron speaks",
                 "Summit in Rome", "x", "Merkel in Paris"],
        "facts": [_facts(who="Merkel", what="summit", where="Paris"),
                  _facts(who="Merkel", what="summit", where="Berlin"),
                  _facts(who="Macron"), None, "", None],
    })
    res = score_predictions(df)
    r = res["m"]
    assert r["n"] == 5
    # who: 3 rows with the slot, all named -> 1.0; what: 2 rows, 1 named -> 0.5; where: 2 of 2 -> 1.0.
    assert r["slot_who"] == 1.0 and r["slot_who_ci"] == [1.0, 1.0]
    assert r["slot_what"] == 0.5 and r["slot_where"] == 1.0
    # Every slot named: row 1 no, row 2 yes, row 3 yes -> 2/3.
    assert r["slots_all"] == pytest.approx(2 / 3)
    lo, hi = r["slots_all_ci"]
    assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0
    assert list(r)[7:] == ["slot_who", "slot_who_ci", "slot_what", "slot_what_ci", "slot_where",
                           "slot_where_ci", "slots_all", "slots_all_ci"]
    # The text scores still count every row, facts or not.
    assert r["contains"] == pytest.approx(1 / 5)
    # A method none of whose rows has facts gets no slot keys.
    assert not any(k.startswith("slot") for k in res["base"])
    json.dumps(res)


def test_score_predictions_bad_facts():
    def frame(facts):
        return pl.DataFrame({"method": ["m", "m"], "pred": ["a", "b"], "gold": ["ok gold", "Storm hits coast"],
                             "facts": [_facts(who="a"), facts]})

    with pytest.raises(ValueError, match=r"method 'm', row with gold 'Storm hits coast': facts is not valid JSON"):
        score_predictions(frame('{"who": "storm",'))
    with pytest.raises(ValueError, match="must be a JSON object"):
        score_predictions(frame('["storm"]'))
    with pytest.raises(ValueError, match="non-empty string keys"):
        score_predictions(frame(_facts(who="storm", where="")))
    with pytest.raises(ValueError, match="non-empty string keys"):
        score_predictions(frame(_facts(who=3)))
    with pytest.raises(ValueError, match="facts column has dtype"):
        score_predictions(HEADLINES.with_columns(facts=pl.lit(1)))


def test_parse_grade():
    assert parse_grade("4") == 4
    assert parse_grade("Grade: 5.") == 5
    assert parse_grade("I'd say 2, maybe 3") == 2
    assert parse_grade("10 out of 10") is None
    assert parse_grade("0 or 6") is None
    assert parse_grade("") is None and parse_grade(None) is None


def test_judge_prompt_holds_rubric_and_both_texts():
    msgs = judge_prompt("", "volcanoes")
    assert msgs[0] == {"role": "system", "content": JUDGE_RUBRIC}
    assert "volcanoes" in msgs[1]["content"] and "(no answer)" in msgs[1]["content"]


@pytest.fixture
def canned_server(monkeypatch):
    """Starts local servers that send the given (status, body) replies in turn; gives (base_url, requests)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(replies):
        seen = []

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a stalled client cannot block the server thread, and so shutdown()

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                # self.headers, not a dict of it: header names are case-insensitive and clients vary.
                seen.append({"path": self.path, "headers": self.headers, "body": json.loads(body)})
                status, payload = replies[min(len(seen), len(replies)) - 1]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status != 200:
                    # The client honours a server-set delay, so retries take 10 ms instead of its ~0.5 s+ backoff.
                    self.send_header("Retry-After-Ms", "10")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        srv = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", seen

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


OK = (200, {"choices": [{"message": {"content": "4"}}]})
judge_timeout = pytest.mark.timeout(60)  # a hung socket fails the test instead of the run


@judge_timeout
def test_judge_grades_via_local_server(canned_server, monkeypatch):
    url, seen = canned_server([OK])
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    judge = LLMJudge(url + "/", "judge-model-x", api_key_env="TEST_JUDGE_KEY", timeout=5, tries=1)
    assert judge.grade("lava mountains", "volcanoes") == 4
    (req,) = seen
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-model-x" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][0]["content"] == JUDGE_RUBRIC
    assert "lava mountains" in req["body"]["messages"][1]["content"]
    assert req["headers"]["Authorization"] == "Bearer sk-test"


@judge_timeout
def test_judge_without_key_never_sends_openai_key(canned_server, monkeypatch):
    url, seen = canned_server([(200, {"choices": [{"message": {"content": "Grade: 2"}}]})])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key")
    assert LLMJudge(url, "m", timeout=5, tries=1).grade("a", "b") == 2
    assert "sk-real-openai-key" not in seen[0]["headers"].get("Authorization", "")


@judge_timeout
def test_judge_summary_rubric_is_sent(canned_server):
    url, seen = canned_server([OK])
    judge = LLMJudge(url, "m", timeout=5, tries=1, rubric="summary")
    assert judge.grade("A storm hit the coast on Monday.", "Hurricane makes landfall in Florida") == 4
    system, user = seen[0]["body"]["messages"]
    assert system == {"role": "system", "content": SUMMARY_RUBRIC}
    assert "Reference headline: Hurricane makes landfall in Florida" in user["content"]
    assert "Predicted summary: A storm hit the coast on Monday." in user["content"]


@judge_timeout
def test_judge_retries_server_errors(canned_server):
    url, seen = canned_server([(500, {"error": "busy"}), (503, {"error": "busy"}), OK])
    assert LLMJudge(url, "m", timeout=5, tries=3).grade("a", "b") == 4
    assert len(seen) == 3
    url, seen = canned_server([(500, {"error": "busy"})])
    with pytest.raises(JudgeError, match=r"failed 3 times .*HTTP 500.*busy"):
        LLMJudge(url, "m", timeout=5, tries=3).grade("a", "b")
    assert len(seen) == 3


@judge_timeout
def test_judge_client_error_is_clear_and_not_retried(canned_server):
    url, seen = canned_server([(400, {"error": "unknown model"})])
    with pytest.raises(JudgeError, match=r"/v1/chat/completions returned HTTP 400.*unknown model"):
        LLMJudge(url, "nope", timeout=5, tries=3).grade("a", "b")
    assert len(seen) == 1


@judge_timeout
def test_judge_connection_error_names_url(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a loopback port that was just free, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed 1 times"):
        LLMJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=2, tries=1).grade("a", "b")


def test_judge_config_errors(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_JUDGE_KEY is not set"):
        LLMJudge("http://127.0.0.1:1", "m", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(ValueError, match="must start with http"):
        LLMJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match=r"rubric 'haiku' is unknown.*'summary', 'topic'"):
        LLMJudge("http://127.0.0.1:1", "m", rubric="haiku")
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail as if not installed
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[judge]"')):
        LLMJudge("http://127.0.0.1:1", "m")


def test_judge_summary():
    s = judge_summary([5, 4, 4, None, 1])
    assert s["judge_mean"] == 3.5 and s["judge_failed"] == 1
    assert s["judge_dist"] == {"1": 0.25, "2": 0.0, "3": 0.0, "4": 0.5, "5": 0.25}
    lo, hi = s["judge_mean_ci"]
    assert 1.0 <= lo <= 3.5 <= hi <= 5.0
    empty = judge_summary([None, None])
    assert np.isnan(empty["judge_mean"]) and empty["judge_failed"] == 2
    with pytest.raises(ValueError, match="1-5 or None"):
        judge_summary([0, 3])
