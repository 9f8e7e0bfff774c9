"""A conversation that keeps the model's state between turns: each turn sends only its new text.

    conv = Conversation(client, max_new_tokens=200, temperature=0.8, stop=["\\nUser:"])
    reply = conv.say("User: hello\\nBot:")
    reply = conv.say("\\nUser: and then?\\nBot:")   # the server reads only this turn's text

The server keeps nothing between turns: the state travels with the conversation (`conv.state`,
bytes), so each turn may land on any replica serving the same model, and a conversation can be
saved and taken up later (`Conversation(client, state=saved)`).
"""
from __future__ import annotations

from dataclasses import replace

from lstmgen_client.errors import InvalidArgumentError
from lstmgen_client.types import GenerateResult


def _check_turn(text: str) -> None:
    # An empty turn would be a pure continuation, which sends held-back text that _whole already gave
    if not isinstance(text, str) or not text:
        raise InvalidArgumentError("INVALID_ARGUMENT: text: a conversation turn needs new text "
                                   "(to continue a reply, use client.generate(\"\", state=conv.state))")


def _whole(result: GenerateResult) -> GenerateResult:
    # A turn that ended by length may hold back text that could begin a stop sequence; the next turn
    # starts with new text, so that text belongs to this reply.
    held = result.finished.held_text
    return replace(result, text=result.text + held) if held else result


class Conversation:
    def __init__(self, client, state: bytes | None = None, **params):
        self.client = client
        self.state = state  # the model's state after the last turn (None: nothing read yet)
        self.params = params  # sampling settings for every turn; say(..., **more) overrides them
        self.turns = 0
        self._stopped_on = ""  # the stop sequence that ended the last reply: the model has read it

    def say(self, text: str, **params) -> GenerateResult:
        """Read `text` after everything so far and generate the reply."""
        result = self.client.generate(self._turn(text), state=self.state, return_state=True,
                                      **{**self.params, **params})
        return self._took(result)

    def reset(self) -> None:
        self.state, self.turns, self._stopped_on = None, 0, ""

    def _turn(self, text: str) -> str:
        """The text the model has not read yet: a reply that ended on a stop sequence (say "\\nUser:")
        has read it, so a turn that starts with it sends only the rest."""
        _check_turn(text)
        return text[len(self._stopped_on):] if self._stopped_on and text.startswith(self._stopped_on) else text

    def _took(self, result: GenerateResult) -> GenerateResult:
        f = result.finished
        self.state, self.turns = result.state, self.turns + 1
        self._stopped_on = f.stop_sequence if f.reason == "stop_sequence" else ""
        return _whole(result)


class AsyncConversation(Conversation):
    """The same with an AsyncClient: `await conv.say(text)`."""

    async def say(self, text: str, **params) -> GenerateResult:
        result = await self.client.generate(self._turn(text), state=self.state, return_state=True,
                                            **{**self.params, **params})
        return self._took(result)
