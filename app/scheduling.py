"""Which requests are background work: titles, tags, follow-up suggestions and the like, which front ends
such as Open WebUI send beside a person's own messages. The card serves people first (runner/card.py).

A request is background when one of the configured rules (scheduling.background) matches it: a regular
expression searched in its last user message, in any of its system messages, in the model name it asked
for, or in a request header's value. The defaults recognise Open WebUI's task prompts and two headers a
client can send on purpose: RFC 9218's `Priority: u=7` (the lowest urgency) and `X-Qwen-Task: <anything>`.
"""
import re

from app.runner.jobs import BACKGROUND, INTERACTIVE


class Classifier:
    def __init__(self, rules):
        self.rules = []
        for rule in rules:
            if "header" in rule:
                self.rules.append(("header", rule["header"], re.compile(rule["pattern"])))
            else:
                (kind, pattern), = rule.items()
                self.rules.append((kind, None, re.compile(pattern)))

    def request_class(self, headers, messages=(), model=""):
        """INTERACTIVE or BACKGROUND for a request: its headers, its messages as the chat template reads them
        (a raw prompt counts as the last user message), and the model name it asked for."""
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        for kind, header, pattern in self.rules:
            if kind == "header":
                texts = [headers.get(header, "")]
            elif kind == "last_user_message":
                texts = [last_user] if isinstance(last_user, str) else []
            elif kind == "system_message":
                texts = [m["content"] for m in messages if m["role"] == "system" and isinstance(m["content"], str)]
            else:
                texts = [model or ""]
            if any(pattern.search(text) for text in texts):
                return BACKGROUND
        return INTERACTIVE
