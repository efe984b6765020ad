"""People before background work: the card's two classes, preemption, and the rules that classify requests.

The card tests drive a real Card (emulated runner under a pty) at a pace slow enough for the order of events
to be observable; test_open_webui_pattern_through_gunicorn does the same through real gunicorn.
"""
import threading
import time

import httpx
import pytest

from app import config
from app.runner.jobs import BACKGROUND, INTERACTIVE, Done, Failed, Requeued, Started, Text
from app.runner.errors import QueueFull
from app.scheduling import Classifier
from tests.helpers import MODEL, answer_to
from tests.helpers.jobs import result_of, spec_for


ask = spec_for


class Watch:
    """Reads a job's events on a thread, with the time each arrived."""

    def __init__(self, job):
        self.job = job
        self.events = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            event = self.job.next_event(60)
            with self.changed:
                self.events.append((time.monotonic(), event))
                self.changed.notify_all()
            if event is None or isinstance(event, (Done, Failed)):
                return

    def wait(self, kind, count=1, timeout=60):
        """The time the `count`-th event of this kind arrived."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.times(kind)) >= count, timeout), (kind, self.events)
            return self.times(kind)[count - 1]

    def times(self, kind):
        return [at for at, event in self.events if isinstance(event, kind)]

    def result(self):
        self.wait(Done)
        return next(event.result for _, event in self.events if isinstance(event, Done))


def test_a_background_job_gives_way_and_runs_again_completely(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 15})
    assert card.wait_ready(30) == "ready"
    background = Watch(card.submit(ask(tokenizer, "### Task: title, count to 60", request_class=BACKGROUND)))
    background.wait(Text)  # well into its answer (a whole answer: its client has seen nothing)
    person = Watch(card.submit(ask(tokenizer, "a person", request_class=INTERACTIVE, streamed=True)))
    assert person.result().text == answer_to("a person")
    assert background.result().text == answer_to("### Task: title, count to 60")
    assert background.times(Requeued) and len(background.times(Started)) == 2
    assert person.job.finished_at <= background.job.started_at  # the person first, then the task again
    assert card.preemptions == 1


def test_a_streamed_background_job_that_sent_text_runs_to_the_end(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 15})
    assert card.wait_ready(30) == "ready"
    background = Watch(card.submit(ask(tokenizer, "count to 60", request_class=BACKGROUND, streamed=True)))
    background.wait(Text)
    person = Watch(card.submit(ask(tokenizer, "a person", request_class=INTERACTIVE, streamed=True)))
    assert background.result().text == answer_to("count to 60")
    person.wait(Done)
    assert background.job.finished_at <= person.job.started_at
    assert not background.times(Requeued) and card.preemptions == 0


def test_a_streamed_background_job_still_reading_its_prompt_gives_way(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 15})
    assert card.wait_ready(30) == "ready"
    background = Watch(card.submit(ask(tokenizer, "### Task: " + "7" * 200, request_class=BACKGROUND, streamed=True)))
    background.wait(Started)  # ~210 prompt tokens at 15 ms: three seconds before its first text
    person = Watch(card.submit(ask(tokenizer, "me first", request_class=INTERACTIVE, streamed=True)))
    assert person.result().text == answer_to("me first")
    assert background.result().text == answer_to("### Task: " + "7" * 200)
    kinds = [type(event) for _, event in background.events]
    assert kinds[:3] == [Started, Requeued, Started] and kinds[-1] is Done  # no text before it gave way


def test_people_are_served_before_waiting_background_work(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 10})
    assert card.wait_ready(30) == "ready"
    first = Watch(card.submit(ask(tokenizer, "count to 30", request_class=INTERACTIVE, streamed=True)))
    first.wait(Started)
    task = Watch(card.submit(ask(tokenizer, "### Task: tags", request_class=BACKGROUND)))
    person = Watch(card.submit(ask(tokenizer, "second person", request_class=INTERACTIVE)))
    assert card.queue_depths() == {INTERACTIVE: 1, BACKGROUND: 1}
    assert card.position(person.job) == 0 and card.position(task.job) == 1
    task.wait(Done)
    assert person.job.started_at < task.job.started_at
    assert task.result().text == answer_to("### Task: tags")


def test_background_work_runs_whenever_nobody_waits(make_card, tokenizer):
    card = make_card()
    jobs = [card.submit(ask(tokenizer, f"### Task: {i}", request_class=BACKGROUND)) for i in range(3)]
    assert [result_of(job, timeout=30).text for job in jobs] == [answer_to(f"### Task: {i}") for i in range(3)]
    assert card.preemptions == 0


def test_a_full_queue_never_turns_a_person_away_for_background_work(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 10}, max_queue=2)
    assert card.wait_ready(30) == "ready"
    running = Watch(card.submit(ask(tokenizer, "count to 50", streamed=True)))
    running.wait(Text)
    older = Watch(card.submit(ask(tokenizer, "### Task: older", request_class=BACKGROUND)))
    newer = Watch(card.submit(ask(tokenizer, "### Task: newer", request_class=BACKGROUND)))
    with pytest.raises(QueueFull):
        card.submit(ask(tokenizer, "### Task: one too many", request_class=BACKGROUND))
    person = Watch(card.submit(ask(tokenizer, "a person", request_class=INTERACTIVE)))
    newer.wait(Failed)
    assert isinstance(newer.events[-1][1].error, QueueFull)
    assert person.result().text == answer_to("a person") and older.result().text == answer_to("### Task: older")
    with pytest.raises(QueueFull):  # two people waiting: the line is full for everyone
        blocker = Watch(card.submit(ask(tokenizer, "count to 50", streamed=True)))
        blocker.wait(Text)
        card.submit(ask(tokenizer, "p1"))
        card.submit(ask(tokenizer, "p2"))
        card.submit(ask(tokenizer, "p3"))


def test_no_preemption_when_it_is_turned_off(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 15}, preempt=False)
    assert card.wait_ready(30) == "ready"
    background = Watch(card.submit(ask(tokenizer, "### Task: count to 40", request_class=BACKGROUND)))
    background.wait(Text)
    person = Watch(card.submit(ask(tokenizer, "a person", request_class=INTERACTIVE)))
    person.wait(Done)
    assert background.job.finished_at <= person.job.started_at and card.preemptions == 0


# -- which requests are background ------------------------------------------------------------------------
DEFAULT_RULES = config.load({})["scheduling"]["background"]


@pytest.mark.parametrize("headers, messages, model, expected", [
    ({}, [{"role": "user", "content": "Hello"}], MODEL, INTERACTIVE),
    ({}, [{"role": "user", "content": "### Task:\nGenerate a concise title"}], MODEL, BACKGROUND),
    ({}, [{"role": "user", "content": "Tell me about ### Task: lists"}], MODEL, INTERACTIVE),
    ({}, [{"role": "user", "content": "Your task is to reflect the speaker's likely facial expression..."}], MODEL,
     BACKGROUND),
    ({}, [{"role": "system", "content": "Available Tools: [...]"}, {"role": "user", "content": "Query: x"}], MODEL,
     BACKGROUND),
    ({"Priority": "u=7"}, [{"role": "user", "content": "Hello"}], MODEL, BACKGROUND),
    ({"Priority": "u=7, i"}, [{"role": "user", "content": "Hello"}], MODEL, BACKGROUND),
    ({"Priority": "u=3"}, [{"role": "user", "content": "Hello"}], MODEL, INTERACTIVE),
    ({"X-Qwen-Task": "title_generation"}, [{"role": "user", "content": "Hello"}], MODEL, BACKGROUND),
    ({"X-Qwen-Task": ""}, [{"role": "user", "content": "Hello"}], MODEL, INTERACTIVE),
    # The last user message decides: an earlier task-looking turn does not.
    ({}, [{"role": "user", "content": "### Task: x"}, {"role": "assistant", "content": "y"},
          {"role": "user", "content": "real question"}], MODEL, INTERACTIVE),
])
def test_default_rules(headers, messages, model, expected):
    assert Classifier(DEFAULT_RULES).request_class(headers, messages, model) == expected


def test_configured_rules_model_names_and_bad_patterns():
    settings = config.load({"scheduling": {"background": [{"model": "^qwen2.5-tasks$"}]}})
    classifier = Classifier(settings["scheduling"]["background"])
    assert classifier.request_class({}, [{"role": "user", "content": "### Task: x"}], "qwen2.5-tasks") == BACKGROUND
    assert classifier.request_class({}, [{"role": "user", "content": "### Task: x"}], MODEL) == INTERACTIVE
    for rule, problem in [({"last_user_message": "("}, "not a valid regular expression"),
                          ({"header": "X-A"}, "need a `pattern`"),
                          ({"model": "a", "system_message": "b"}, "exactly one of")]:
        with pytest.raises(config.ConfigError) as caught:
            config.load({"scheduling": {"background": [rule]}})
        assert any(problem in line and line.startswith("scheduling.background[0]") for line in caught.value.problems), \
            caught.value.problems


# -- through gunicorn ---------------------------------------------------------------------------------------
def test_open_webui_pattern_through_gunicorn(start_server):
    """A title request sent with a person's first message: the person's answer starts first whichever
    reaches the card first, and the title is still answered in full."""
    server = start_server(runner={"emulator": {"token_ms": 15}})
    done, lock = {}, threading.Lock()

    def post(name, body, headers=None):
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        with lock:
            done[name] = (time.monotonic(), response)

    title = {"model": MODEL, "messages": [{"role": "user", "content": "### Task:\nGenerate a title. count to 40"}]}
    person = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello there"}]}
    first = threading.Thread(target=post, args=("title", title))
    first.start()
    server.wait_until_busy()  # the title reached the card first
    first_text = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=person, timeout=120) as response:
        for line in response.iter_lines():
            if '"content":"Emulated' in line and not first_text:
                first_text.append(time.monotonic())
    first.join(120)
    title_at, title_response = done["title"]
    assert title_response.status_code == 200
    assert title_response.json()["choices"][0]["message"]["content"] == answer_to(title["messages"][0]["content"])
    assert first_text[0] < title_at  # the title gave way: it reached the card first and ended last
    assert server.metric("qwen_chat_preemptions_total") == 1
    assert server.metric("qwen_chat_card_requests_total", request_class="background") == 1
    assert "class=background" in server.log() and "class=interactive" in server.log()


def test_a_runner_figure_that_is_not_a_number_leaves_the_pace_alone():
    from app.runner.pace import PromptPace
    from app.runner.driver import GenerationResult
    pace = PromptPace(0.07)
    for figure in (float("nan"), float("inf"), 0.0):
        pace.observe(GenerationResult("", [], "cancelled", prompt_tokens=40, runner_tokens_per_second=figure))
    assert pace.seconds_per_token == 0.07
    pace.observe(GenerationResult("x", [1], "stop", prompt_tokens=40, prompt_seconds=4.2))
    assert pace.seconds_per_token == pytest.approx(0.1)
