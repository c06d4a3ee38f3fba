"""A stream's conversation as token ids, grown one turn at a time through the model's chat template.

The template is the one vLLM's chat endpoint would use (``--chat-template``, else the processor's,
else the tokenizer's: vLLM's ``resolve_chat_template``); this module never writes a model's special
tokens itself. Each question appends exactly the text the template adds for a new user turn (a video
placeholder per chunk the turn brings, then the question) to the ids of everything before it, so past
turns keep their ids and the prefix cache serves them; after an answer, the template's end-of-turn
text follows the generated ids. The turn's videos are tokenized apart from its text, so the ids of an
eager prefill (:meth:`ChatPrompt.video_prefix`: the turn up to its last video) are a prefix of the
question's.
"""

from __future__ import annotations

from collections.abc import Sequence

_PROBE = "\x00dtd-probe\x00"


class ChatPrompt:
    """Token ids of one stream's conversation.

    Args:
        tokenizer: the served tokenizer (``encode``, ``decode``, ``apply_chat_template``).
        template: the chat template (Jinja source) vLLM resolved for the served model.
        system: the stream's instructions: a system message before every turn (kept by re-anchors);
            None: the template's default.
    """

    def __init__(self, tokenizer, template: str | None, system: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.messages: list[dict] = []  # the conversation as text, only to render the next turn's delta
        self.ids: list[int] = []  # the conversation as served: prompt ids, generated ids, end-of-turn ids
        self.open_videos = 0  # videos of the open user turn already prefilled (eager), before its question
        self.end_of_turn = self._end_of_turn()
        self.restart([], 0)

    def _with_system(self, messages: Sequence[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(messages)

    def _rendered(self, messages: Sequence[dict]) -> str:
        """The conversation ``messages`` (after the system message, if any) as the template writes it."""
        if not messages and not self.system:
            return ""
        return self.render(self._with_system(messages), add_generation_prompt=False)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _end_of_turn(self) -> str:
        """What the template writes after an assistant message's content (Qwen: ``<|im_end|>\\n``)."""
        user = {"role": "user", "content": [{"type": "text", "text": "?"}]}
        text = self.render([user, {"role": "assistant", "content": _PROBE}], add_generation_prompt=False)
        return text[text.index(_PROBE) + len(_PROBE) :]

    @staticmethod
    def user_message(question: str, videos: int) -> dict:
        content = [{"type": "video"}] * videos + [{"type": "text", "text": question}]
        return {"role": "user", "content": content}

    def _turn(self, question: str, videos: int) -> tuple[str, str]:
        """(text the template adds for the user turn up to and including its last video placeholder,
        the rest of the turn up to the generation prompt)."""
        before = self._rendered(self.messages)
        after = self.render(self._with_system([*self.messages, self.user_message(question, videos)]), True)
        probe = self.render(self._with_system([*self.messages, self.user_message(_PROBE, videos)]), True)
        if not after.startswith(before) or not probe.startswith(before):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation; "
                "streams need one that does"
            )
        head = probe[len(before) : probe.index(_PROBE)] if videos else ""
        delta = after[len(before) :]
        if not delta.startswith(head):
            raise ValueError(
                "the chat template does not render a turn's videos before its text; streams need one that does"
            )
        return head, delta[len(head) :]

    def video_prefix(self, videos: int) -> list[int]:
        """Ids of the conversation and the open user turn up to its ``videos``-th video placeholder:
        the prompt of an eager prefill, a prefix of the next question's prompt (:meth:`next_turn`)."""
        head, _ = self._turn("", videos)
        return self.ids + self.tokenizer.encode(head, add_special_tokens=False)

    def next_turn(self, question: str, videos: int) -> list[int]:
        """Prompt ids for a question at this point: the conversation so far plus the new user turn
        (its ``videos`` placeholders first: the chunks prefilled since the last answer and the one the
        question brings) and the generation prompt."""
        head, rest = self._turn(question, videos)
        return (
            self.ids
            + self.tokenizer.encode(head, add_special_tokens=False)
            + self.tokenizer.encode(rest, add_special_tokens=False)
        )

    def commit(
        self,
        prompt_ids: list[int],
        question: str,
        videos: int,
        answer_ids: list[int],
        answer_text: str,
        stop_ids: Sequence[int] = (),
    ) -> None:
        """Record a finished turn: its prompt, the generated ids and the template's end of turn (less
        the stop token the model already produced, when the end of turn starts with it)."""
        tail = self.end_of_turn
        if answer_ids and answer_ids[-1] in stop_ids:
            stop_text = self.tokenizer.decode([answer_ids[-1]])
            if stop_text and tail.startswith(stop_text):
                tail = tail[len(stop_text) :]
        self.messages += [self.user_message(question, videos), {"role": "assistant", "content": answer_text}]
        self.open_videos = 0
        self.ids = list(prompt_ids) + list(answer_ids) + self.tokenizer.encode(tail, add_special_tokens=False)

    def forget(self, videos: int) -> None:
        """A finished turn that does not stay in the conversation (``remember: false``): its question
        and answer are dropped, its ``videos`` placeholders stay in the open user turn, as after an
        eager prefill, so the next question's prompt starts with this one's up to its last video."""
        self.open_videos = videos

    def turns_since(self, messages: int) -> list[tuple[str, int, str]]:
        """The turns committed after the first ``messages`` messages, as (question, videos, answer)."""
        out = []
        msgs = self.messages[messages:]
        for user, assistant in zip(msgs[::2], msgs[1::2]):
            text = "".join(p.get("text", "") for p in user["content"] if p.get("type") == "text")
            videos = sum(1 for p in user["content"] if p.get("type") == "video")
            out.append((text, videos, assistant["content"]))
        return out

    def replay(self, question: str, videos: int, answer: str) -> None:
        """Append a finished turn given as text (a turn answered on a conversation this one replaced)."""
        prompt_ids = self.next_turn(question, videos)
        self.commit(prompt_ids, question, videos, self.tokenizer.encode(answer, add_special_tokens=False), answer)

    def last_turns(self, k: int) -> list[tuple[str, str]]:
        """The last ``k`` remembered turns as (question, answer) text."""
        pairs = []
        msgs = self.messages
        for i in range(0, len(msgs) - 1, 2):
            user, assistant = msgs[i], msgs[i + 1]
            text = "".join(p.get("text", "") for p in user["content"] if p.get("type") == "text")
            pairs.append((text, assistant["content"]))
        return pairs[-k:] if k > 0 else []

    def restart(self, turns: Sequence[tuple[str, str]], videos: int) -> None:
        """Start over (a re-anchor): the conversation becomes ``turns`` as text-only turns, then an open
        user turn whose first ``videos`` placeholders are the re-anchored video items (as after an
        eager prefill: the next question adds the new chunk, if any, and its text)."""
        self.messages = []
        for question, answer in turns:
            self.messages += [self.user_message(question, 0), {"role": "assistant", "content": answer}]
        text = self._rendered(self.messages)
        self.ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        self.open_videos = videos
