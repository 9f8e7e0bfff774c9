"""OpenAI chat completions over the completions path: messages -> one prompt through a template.

A recurrent text model has no chat format of its own, so the server writes the conversation as
plain text, one turn after another, and reads the reply that follows. The template says how:

    {"message": "{role}: {content}\\n", "assistant": "assistant: ", "stop": ["\\nuser:", "\\nsystem:"]}

`message` is written once per turn (`{role}`, `{content}`), `assistant` after the last turn (where
the reply starts), and `stop` ends the reply when the model goes on to write the next turn (it is
added to the request's own `stop`). `--chat-template FILE` takes a JSON object with these keys;
the default is the one above. The body becomes a completions body (`chat_to_completion`), so
validation, limits, seeds, logprobs and streaming are the completions path's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lstmgen.errors import UserError
from lstmgen.serve.errors import InvalidRequest
from lstmgen.serve.openai_compat import FINISH_REASON, check_object, shown_value
from lstmgen.serve.records import Finished, TokenLogprob

ROLES = ("system", "developer", "user", "assistant")
# Chat parameters with a completions counterpart of the same name (the rest are mapped below)
_SAME = {"model", "user", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
         "frequency_penalty", "presence_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty",
         "skip_unknown", "max_tokens"}
_KNOWN = _SAME | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


class ChatTemplateError(UserError):
    """The --chat-template file is unreadable or malformed (message names the file and the key)."""


@dataclass(frozen=True)
class ChatTemplate:
    message: str = "{role}: {content}\n"
    assistant: str = "assistant: "
    stop: tuple[str, ...] = ("\nuser:", "\nsystem:")

    def render(self, turns: list[tuple[str, str]]) -> str:
        return "".join(self.message.format(role=r, content=c) for r, c in turns) + self.assistant


def load_chat_template(path: str | Path) -> ChatTemplate:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ChatTemplateError(f"{path}: cannot read the chat template (--chat-template): {e}") from None
    if not isinstance(raw, dict) or set(raw) - {"message", "assistant", "stop"}:
        raise ChatTemplateError(f"{path}: expected a JSON object with the keys message, assistant and stop")
    t = ChatTemplate()
    message, assistant = raw.get("message", t.message), raw.get("assistant", t.assistant)
    stop = raw.get("stop", list(t.stop))
    if not isinstance(message, str) or not isinstance(assistant, str):
        raise ChatTemplateError(f"{path}: \"message\" and \"assistant\" must be strings")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ChatTemplateError(f"{path}: \"stop\" must be a list of non-empty strings")
    try:
        message.format(role="user", content="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ChatTemplateError(f"{path}: \"message\" may use {{role}} and {{content}} only (write {{{{ for a "
                                f"brace): {e!r}") from None
    return ChatTemplate(message, assistant, tuple(stop))


def _content(i: int, content: object) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidRequest(f"messages[{i}].content", "expected a string or a list of text parts (this model reads "
                                                   "text only)")


def _turns(messages: object) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "is required: a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}]", "expected an object with \"role\" and \"content\"")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"is {shown_value(role)}; allowed: {', '.join(ROLES)}")
        turns.append((role, _content(i, m.get("content"))))
    return turns


def chat_to_completion(body: object, template: ChatTemplate) -> dict:
    """A /v1/chat/completions body -> the /v1/completions body that generates its reply."""
    body = check_object(body, _KNOWN, "/v1/chat/completions", " (a plain text model: no tools, functions or "
                                                               "response formats)")
    out = {k: v for k, v in body.items() if k in _SAME}
    out["prompt"] = template.render(_turns(body.get("messages")))
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]
    stop = body.get("stop")
    user_stop = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequest("stop", "expected a string or a list of strings")
    out["stop"] = [*user_stop, *template.stop]  # the user's first: an error names stop[i] as they wrote it
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("logprobs", f"is {shown_value(logprobs)}; expected true or false")
    if top is not None and not logprobs:
        raise InvalidRequest("top_logprobs", "needs \"logprobs\": true")
    if logprobs:
        out["logprobs"] = 0 if top is None else top
    return out


def chat_param(name: str) -> str:
    """A completions parameter an error names -> the chat parameter the client wrote."""
    if name.startswith("prompt"):
        return "messages"
    return {"logprobs": "top_logprobs"}.get(name, name)


def _logprob_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "backslashreplace"))}


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    return {"content": [{**_logprob_entry(lp.text, lp.logprob),
                         "top_logprobs": [_logprob_entry(text, v) for _t, text, v in lp.top]} for lp in lps]}


class ChatFormat:
    """Response bodies of /v1/chat/completions (the edge's `Format`)."""

    id_prefix, whole, chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"
    param = staticmethod(chat_param)

    @staticmethod
    def choice(i: int, text: str, lps: list[TokenLogprob] | None, fin: Finished | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": chat_logprobs(lps) if lps is not None else None,
                "finish_reason": FINISH_REASON[fin.reason] if fin else None, **({"seed": fin.seed} if fin else {})}

    @staticmethod
    def delta(i: int, text: str, lps: list[TokenLogprob] | None, offset: int, fin: Finished | None) -> dict:
        delta = {"role": "assistant", "content": text} if offset == 0 else {"content": text}
        return {"index": i, "delta": delta, "logprobs": chat_logprobs(lps) if lps is not None else None,
                "finish_reason": FINISH_REASON[fin.reason] if fin else None, **({"seed": fin.seed} if fin else {})}
