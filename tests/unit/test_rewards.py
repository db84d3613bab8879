"""Prompts and rewards chosen by configuration (run.prompts, run.reward), batch scorers, the new built-in tasks."""

import json
import math
import textwrap
import time

import pytest

from actors.rewards import load_prompt_records, load_prompts, load_reward, task_problems
from actors.tasks import TASKS, TaskSetupError, format_reward, get_task, resolve_task, sentiment_reward
from common.config import ConfigError, load_config

PLUGIN = """
import math

def per_sample(prompt, completion):
    return float(len(completion))

def with_extras(prompt, completion, target=0):
    return float(len(completion) == target)

def broken(prompt, completion):
    raise RuntimeError("reward server down")

def not_finite(prompt, completion):
    return math.inf if completion == "inf" else 1.0

def batched(prompts, completions, target):
    return [float(len(c) == (t or 0)) for c, t in zip(completions, target)]
batched.batched = True

def batched_short(prompts, completions):
    return [1.0]
batched_short.batched = True
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A real module on sys.path, as a user's reward module would be (PYTHONPATH)."""
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_prompts_from_jsonl_carry_their_extra_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a?", "target": 3}, {"prompt": "b?"}, "c?", {"prompt": "a?", "target": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts, extras = load_prompt_records(str(path))
    assert prompts == ("a?", "b?", "c?", "a?")  # repeats kept: they weight the sampling
    assert extras == {"a?": {"target": 3}}
    assert load_prompts(str(path), get_task("letters")) == prompts
    assert load_prompts("", get_task("letters")) == get_task("letters").prompts


def test_prompts_from_txt_skip_blank_lines_and_bad_files_say_where(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  \nsecond prompt\n")
    assert load_prompts(str(tmp_path / "p.txt"), get_task("letters")) == ("first prompt", "second prompt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n{"text": "no prompt"}\n')
    with pytest.raises(TaskSetupError, match=r"2 bad line\(s\):\n  line 2: not JSON.*\n  line 3: expected"):
        load_prompt_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(TaskSetupError, match="no such file"):
        load_prompt_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TaskSetupError, match="no prompts"):
        load_prompt_records(str(tmp_path / "empty.txt"))


def test_hf_prompts_without_datasets_or_network_fail_clearly():
    # Either the package is missing (this machine) or the hub is out of reach: both say what to do instead.
    with pytest.raises(
        TaskSetupError, match=r"(needs the 'datasets' package|could not load dataset).*\.jsonl"
    ):
        load_prompt_records("hf:no-such-org/no-such-dataset:train:text")


def test_config_lists_prompt_and_reward_format_errors_with_the_others():
    with pytest.raises(ConfigError) as err:
        load_config(None, ['run.prompts="p.csv"', 'run.reward="not a function"', "lora.rank=0"])
    text = str(err.value)
    assert "run.prompts='p.csv'" in text and "run.reward='not a function'" in text and "lora.rank=0" in text
    with pytest.raises(ConfigError, match="hf:NAME, hf:NAME:SPLIT"):
        load_config(None, ['run.prompts="hf::train"'])
    with pytest.raises(ConfigError, match="rm:PATH"):
        load_config(None, ['run.reward="rm:"'])
    cfg = load_config(None, ['run.prompts="hf:imdb:test:text"', 'run.reward="pkg.mod:score"'])
    assert (cfg.run.prompts, cfg.run.reward) == ("hf:imdb:test:text", "pkg.mod:score")


def test_per_sample_plugin_scores_and_failures_score_nan(plugin, caplog):
    task = get_task("letters")
    assert load_reward(f"{plugin}:per_sample", task)(["p", "q"], ["abc", ""]) == [3.0, 0.0]
    assert all(math.isnan(s) for s in load_reward(f"{plugin}:broken", task)(["p", "q"], ["a", "b"]))
    assert "RuntimeError: reward server down" in caplog.text
    scores = load_reward(f"{plugin}:not_finite", task)(["p", "p"], ["inf", "x"])
    assert math.isnan(scores[0]) and scores[1] == 1.0
    assert "returned inf" in caplog.text


def test_extras_reach_rewards_that_name_them(plugin, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "three", "target": 3}\n{"prompt": "none"}\n')
    cfg = load_config(None, [f'run.prompts="{path}"', f'run.reward="{plugin}:with_extras"'])
    task = resolve_task(cfg)
    assert task.prompts == ("three", "none")
    assert task.scorer(["three", "three", "none"], ["abc", "ab", ""]) == [1.0, 0.0, 1.0]  # default target=0
    # A plain (prompt, completion) reward works with the same file: it is given no extras.
    plain = load_reward(f"{plugin}:per_sample", task)
    assert plain(["three"], ["abcd"]) == [4.0]
    batched = load_reward(f"{plugin}:batched", task)
    assert batched(["three", "none", "three"], ["abc", "", "x"]) == [1.0, 1.0, 0.0]  # lists, None if absent


def test_batched_reward_of_the_wrong_length_scores_the_batch_nan(plugin, caplog):
    scores = load_reward(f"{plugin}:batched_short", get_task("letters"))(["a", "b"], ["x", "y"])
    assert len(scores) == 2 and all(math.isnan(s) for s in scores)
    assert "returned 1 scores for 2 completions" in caplog.text


def test_unimportable_rewards_and_missing_files_are_setup_errors(plugin, tmp_path):
    with pytest.raises(TaskSetupError, match="cannot import 'no_such_module'.*PYTHONPATH"):
        load_reward("no_such_module:score", get_task("letters"))
    with pytest.raises(TaskSetupError, match="has no function 'nope'"):
        load_reward(f"{plugin}:nope", get_task("letters"))
    cfg = load_config(
        None,
        [
            'run.task="nonsense"',
            f'run.prompts="{tmp_path / "missing.txt"}"',
            f'run.reward="rm:{tmp_path}"',
        ],
    )
    problems = task_problems(cfg)
    assert len(problems) == 3 and "unknown task 'nonsense'" in problems[0]
    assert "no such file" in problems[1] and "no reward_model.json" in problems[2]
    with pytest.raises(TaskSetupError, match="unknown task"):
        resolve_task(cfg)


def test_builtin_tasks_still_resolve_and_score():
    cfg = load_config(None, ['run.task="arithmetic"'])
    task = resolve_task(cfg)
    assert task.prompts == TASKS["arithmetic"].prompts
    assert task.scorer(["What is 9 + 2? Answer with the number."] * 2, ["11", "12"]) == [1.0, 0.0]


def test_sentiment_reward_orders_positive_above_neutral_above_negative():
    positive = "I loved this café: the coffee was wonderful and the staff were friendly and kind."
    neutral = "The café is on the corner of the street."
    negative = "Terrible place. The coffee was awful, cold and the staff were rude. I hated it."
    scores = [sentiment_reward("Review a café.", text) for text in (positive, neutral, negative)]
    assert scores[0] > scores[1] > scores[2]
    assert 0.0 <= scores[2] < 0.5 < scores[0] <= 1.0 and scores[1] == 0.5
    task = resolve_task(load_config(None, ['run.task="sentiment"']))
    assert task.scorer(task.prompts[:2], [positive, negative]) == scores[:1] + scores[2:]


@pytest.mark.parametrize(
    "completion,kwargs,score",
    [
        ("The sun is a star.", {"max_words": 8}, 1.0),
        ("The sun is a star", {"max_words": 8}, 0.5),  # no period
        ("The sun is a very big and very hot star in the sky.", {"max_words": 6}, 0.5 + 0.5 * 6 / 13),
        ("", {"max_words": 8}, 0.0),
        ('{"name": "Tom", "color": "grey"}', {"json_keys": ["name", "color"]}, 1.0),
        ('```json\n{"name": "Tom"}\n```', {"json_keys": ["name", "color"]}, 0.7),  # fenced, one key of two
        ('{"name": "Tom", "color": "grey", "age": 3}', {"json_keys": ["name", "color"]}, 2 / 3),
        ("name: Tom, color: grey", {"json_keys": ["name", "color"]}, 0.0),
        ('["name", "color"]', {"json_keys": ["name", "color"]}, 0.0),
    ],
)
def test_format_reward(completion, kwargs, score):
    assert format_reward("", completion, **kwargs) == pytest.approx(score)


def test_format_task_passes_each_prompt_its_format():
    task = resolve_task(load_config(None, ['run.task="format"']))
    sentence = next(p for p in task.prompts if "at most 8 words" in p)
    json_prompt = next(p for p in task.prompts if '"name" and "color"' in p)
    answer = '{"name": "Tom", "color": "grey"}'
    assert task.scorer([sentence, json_prompt, json_prompt], ["A star.", answer, "A star."]) == [
        1.0,
        1.0,
        0.0,
    ]


def test_a_reward_module_is_found_by_its_dotted_path(tmp_path, monkeypatch):
    package = tmp_path / "team" / "rewards"
    package.mkdir(parents=True)
    (tmp_path / "team" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "brevity.py").write_text(
        textwrap.dedent(
            """
            def score(prompt: str, completion: str) -> float:
                return 1.0 / (1 + len(completion.split()))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ['run.reward="team.rewards.brevity:score"'])
    assert task_problems(cfg) == []
    assert resolve_task(cfg).scorer(["q"], ["one two three"]) == [0.25]


def test_actor_scores_its_batch_through_the_configured_reward(plugin, model_cache, tmp_path):
    """generate_batch with run.prompts and a reward that fails on some answers: exactly those sequences score
    NaN (the learner drops their groups), the others keep their scores."""
    from actors.actor import ActorWorker
    from common.lora import attach_lora
    from common.models import load_model
    from common.transport import ActorSockets, Endpoints, zmq_context

    (tmp_path / "p.txt").write_text("say something\nsay more\n")
    (tmp_path / "flaky_reward.py").write_text(
        "def score(prompt, completion):\n    if len(completion) % 2:\n        raise ValueError('odd')\n    return 1.0\n"
    )
    cfg = load_config(
        None,
        [f'run.prompts="{tmp_path / "p.txt"}"', 'run.reward="flaky_reward:score"', 'model.name="tiny"']
        + [f'model.cache_dir="{model_cache}"', "sampling.batch_size=8", "sampling.max_new_tokens=6"]
        + ["ppo.group_size=2"],
    )
    loaded = load_model(cfg.model)
    attach_lora(loaded.model, cfg.lora)
    with zmq_context() as ctx:
        sockets = ActorSockets(ctx, Endpoints.inproc(), 2)
        worker = ActorWorker(cfg, 0, 1, sockets, loaded.model, loaded.tokenizer, resolve_task(cfg))
        batch = worker.generate_batch()
        sockets.close()
    offset, expected = 0, []
    for seq in batch.sequences:
        response = batch.tokens[offset + seq.prompt_len : offset + seq.prompt_len + seq.response_len]
        text = loaded.tokenizer.decode([int(t) for t in response if int(t) not in worker.stop_ids])
        expected.append(math.nan if len(text) % 2 else 1.0)
        offset += seq.prompt_len + seq.response_len
        assert worker.prompt_texts[seq.prompt_index] in ("say something", "say more")
    assert [s.score for s in batch.sequences] == pytest.approx(expected, nan_ok=True)
    assert 0 < sum(map(math.isnan, expected)) < len(expected)  # both kinds occur (fixed seeds)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "ok"}\n' + b"[" * 100_000 + b"\n", "line 2: JSON nested too deeply"),
        (b'{"prompt": "caf\xe9"}\n', "is not UTF-8 text"),
    ],
)
def test_a_hostile_prompt_file_is_refused_naming_the_file(tmp_path, content, message):
    """Attack table row 15 (issue 15): RecursionError and 3 wasted actor restarts; the error named no file."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(TaskSetupError) as err:
        load_prompt_records(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


HOSTILE_PLUGIN = """
import signal, subprocess, sys

def _hang():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as C code that blocks signals may
    while True:
        pass

def backtracks(prompt, completion):
    if completion == "hang":
        _hang()
    return 1.0

def chatty(prompt, completion):
    for _ in range(200_000):
        print("x" * 100)  # 20 MB of output per sample
    return 2.0

def forks(prompt, completion):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if completion == "hang":
        _hang()
    return 3.0
"""


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    (tmp_path / "hostile_rewards.py").write_text(HOSTILE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hostile_rewards"


def test_a_reward_hung_in_c_code_is_killed_and_the_rest_scored(hostile):
    """Attack table row 13 (issue 15): a plugin looping inside C code hung the actor forever. Here the loop has
    blocked the timer's signal, so only killing its process ends it."""
    scorer = load_reward(f"{hostile}:backtracks", get_task("letters"), timeout_s=1.0)
    try:
        scores = scorer(["p", "p", "p"], ["ok", "hang", "fine"])
        assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 1.0
        assert scorer.killed == 1
    finally:
        scorer.close()


def test_a_reward_that_prints_a_flood_is_capped_in_the_log(hostile, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="actors.reward_process")
    scorer = load_reward(f"{hostile}:chatty", get_task("letters"), timeout_s=30.0)
    try:
        assert scorer(["p", "p"], ["a", "b"]) == [2.0, 2.0]
    finally:
        scorer.close()
    forwarded = [r for r in caplog.records if "xxxx" in r.getMessage()]
    assert 0 < len(forwarded) <= 40  # of 400,000 lines: a window's share or two, the rest counted and dropped


def test_what_a_hung_reward_started_dies_with_it(hostile):
    import psutil

    scorer = load_reward(f"{hostile}:forks", get_task("letters"), timeout_s=1.0)
    try:
        scores = scorer(["p", "p"], ["ok", "hang"])
        assert scores[0] == 3.0 and math.isnan(scores[1])
    finally:
        scorer.close()

    def sleepers() -> list:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if "time.sleep(600)" in " ".join(p.info["cmdline"] or [])
        ]

    deadline = time.monotonic() + 10
    while sleepers() and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILL is delivered, the process is not reaped at once
    assert sleepers() == []
