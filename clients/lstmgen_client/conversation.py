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

from lstmgen_client.types import GenerateResult


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

    def say(self, text: str, **params) -> GenerateResult:
        """Read `text` after everything so far and generate the reply."""
        result = self.client.generate(text, state=self.state, return_state=True, **{**self.params, **params})
        self.state, self.turns = result.state, self.turns + 1
        return _whole(result)

    def reset(self) -> None:
        self.state, self.turns = None, 0


class AsyncConversation(Conversation):
    """The same with an AsyncClient: `await conv.say(text)`."""

    async def say(self, text: str, **params) -> GenerateResult:
        result = await self.client.generate(text, state=self.state, return_state=True,
                                            **{**self.params, **params})
        self.state, self.turns = result.state, self.turns + 1
        return _whole(result)
