"""Every sentence a user sees is written in bot/replies.py (issue 12): an AST scan of bot/ for text literals handed to
whatever shows text to a person (a chat message or its edit, a picture's caption, a button's answer, a web error or
notice, an HTTP refusal, a command menu, a console line, an exception the core shows to the user).

What stays out of scope, on purpose: log calls, exceptions for the owner's log and the command line, docstrings, the
web page's widget labels and headings (layout, like HTML), and identifiers or markup (no space, no sentence end)."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

from bot import replies
from bot.chat import PlainMarkup
from bot.limits import Refusal
from bot.store import Refused
from engine.jobs import Failure

BOT = Path(__file__).resolve().parents[1] / "bot"

SAYS = {
    # chat conversations (bot.chat.Conversation, the adapters' own senders, Discord's followups and channels)
    "send_text", "edit_text", "send_message", "edit_message", "send_photo", "send_document", "reply_text", "answer",
    "send", "_tell", "_print",
    # what the core hands an adapter to show: a picture (its caption), a button (its label)
    "Picture", "Button",
    # the web page: Gradio's pop-ups, plain HTTP answers, the per-user inbox, a page update
    "Error", "Info", "Warning", "PlainTextResponse", "HTMLResponse", "inbox.add", "Update",
    # command menus: Telegram's setMyCommands, Discord's slash commands, their groups and options
    "set_my_commands", "BotCommand", "command", "Group", "describe",
    # exceptions the core shows to the user: a /draw it could not read (bot.commands says what is wrong, as data)
    "UsageError",
}
"""Calls whose arguments reach a person: by the called name, or by its dotted tail (`self._inbox.add`)."""

TEXT_KEYWORDS = {"text", "caption", "content", "description", "message", "label"}
"""Keyword arguments of those calls that carry words (not a file name, an id or an option's name)."""

LAYOUT = "gr."
"""Gradio's widgets (`gr.Button("Draw")`, `gr.Textbox(label=...)`) are the page's layout, not sentences; its
pop-ups (`gr.Error`, `gr.Info`, `gr.Warning`) are."""

WORDED_BY = {"escape", "bold", "code"}
"""Markup calls: `m.escape("...")` is as much a sentence as the bare literal."""


def is_words(text: str) -> bool:
    """Words for a person, not an identifier ('again', 'photo', 'delete'): a letter, and a space or a sentence's end."""
    return any(c.isalpha() for c in text) and (any(c.isspace() for c in text) or text.rstrip().endswith(
        tuple(".!?:…)")))


def has_words(node: ast.AST) -> bool:
    """A text literal a person would read: a string (or f-string part) with a letter in it, bare, joined, chosen by
    a condition, or wrapped in the platform's markup. A call to anything else (replies.*) is not looked into."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and is_words(node.value)
    if isinstance(node, ast.JoinedStr):
        return is_words("".join(v.value for v in node.values if isinstance(v, ast.Constant)))
    if isinstance(node, ast.BinOp):
        return has_words(node.left) or has_words(node.right)
    if isinstance(node, ast.IfExp):
        return has_words(node.body) or has_words(node.orelse)
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(has_words(e) for e in node.elts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WORDED_BY:
        return any(has_words(a) for a in node.args)
    return False


def says(call: ast.Call) -> bool:
    dotted = ast.unparse(call.func)
    name = dotted.rpartition(".")[2]
    if dotted.startswith(LAYOUT) and name not in ("Error", "Info", "Warning"):
        return False
    return name in SAYS or any(dotted.endswith(tail) for tail in SAYS if "." in tail)


def sentences_in(path: Path) -> list[str]:
    """`file:line: call(...)` for every call in `path` that hands a text literal to a person."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not says(node):
            continue
        every_keyword = ast.unparse(node.func).endswith("describe")  # describe(option="what it means", ...)
        worded = [a for a in node.args if has_words(a)]
        worded += [k.value for k in node.keywords if (every_keyword or k.arg in TEXT_KEYWORDS) and has_words(k.value)]
        if worded:
            found.append(f"{path.relative_to(BOT.parent)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def bot_modules() -> list[Path]:
    return sorted(p for p in BOT.rglob("*.py") if p.name != "replies.py")


def test_every_user_facing_sentence_is_written_in_replies():
    found = [line for path in bot_modules() for line in sentences_in(path)]
    assert not found, "sentences a user sees belong in bot/replies.py:\n" + "\n".join(found)


def test_the_scan_finds_a_sentence_written_in_an_adapter(tmp_path, monkeypatch):
    """The scan itself: each kind of call it guards, written the way the adapters wrote them before."""
    module = tmp_path / "bot" / "adapters" / "chatty.py"
    module.parent.mkdir(parents=True)
    module.write_text(textwrap.dedent("""
        async def answer(conv, m, gr, inbox, user, job, exc):
            await conv.send_text(m.escape("Sorry, that did not work."))
            await conv.edit_text(job, f"Drawing {job}…")
            self._inbox.add(user, f"Your picture {job} is ready " "(see My pictures).")
            raise gr.Error("Your session has expired; reload the page.")
            Button("🗑️ Delete", "delete", job)
            tree.command(name="draw", description="Draw a picture")
            app_commands.describe(prompt="What to draw, in words")
            log.warning("job %s failed: %s", job, exc)  # the owner's log: not a sentence for a user
            await conv.send_text(replies.failed(m, exc.failure))  # worded in replies
            gr.Button("Draw", variant="primary")  # the page's layout
            done.add("photo")  # an identifier
            raise UsageError(f"--{name} needs a value, for example: /draw a red fox --seed 42", code="missing_value")
            raise UsageError(MissingValue(name, rules.default_steps))  # data: worded in replies
    """))
    monkeypatch.setattr(sys.modules[__name__], "BOT", tmp_path / "bot")
    found = sentences_in(module)
    assert sorted(int(line.split(": ", 1)[0].rsplit(":", 1)[1]) for line in found) == [3, 4, 5, 6, 7, 8, 9, 14], found


def test_every_failure_and_refusal_has_its_sentence():
    """The engine and the limits say why as data; replies words every value they can take."""
    m = PlainMarkup()
    said = {failure: replies.failed(m, failure) for failure in Failure}
    assert len(set(said.values())) == len(Failure), said  # each its own sentence
    assert replies.failed(m, "an older bot's prose") == said[Failure.CRASHED]  # a row from before: the general one
    for reason in Refusal:
        assert replies.admission_refusal(m, Refused(reason, wait=61, limit=3, active=2)).startswith(
            ("Sorry", "Please", "You", "The")), reason
