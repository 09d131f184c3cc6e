"""Tools for multi-turn rollouts: the calculator, the sandboxed python tool and user tools
(real subprocesses, real limits), the Hermes parser, run_tools, and rendering tools into chat
templates that do and do not support them (tiny-qwen2's real tokenizer)."""

from __future__ import annotations

import pytest

from verlcli.errors import UserError
from verlcli.tools import ToolCall, make_tools, parser_for, render_chat, run_tools, tool_schemas, tool_turn
from verlcli.tools.calculator import evaluate


@pytest.fixture(scope="module")
def tools():
    # A generous limit for calls that must succeed: a loaded CI machine starts Python slowly.
    return make_tools(["calculator", "python"], timeout_s=30.0, memory_mb=256)


@pytest.fixture(scope="module")
def short():
    return make_tools(["python"], timeout_s=1.0, memory_mb=256)


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer

    from verlcli.models.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny-qwen2"))


# -- calculator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, value", [("4821 * 377", 1817517), ("(1 + 2) / 3", 1), ("7 / 2", 3.5),
                                         ("2 ^ 10", 1024), ("-3 ** 2", -9), ("17 // 5 + 17 % 5", 5),
                                         ("max(3, sqrt(16))", 4), ("12 × 3", 36)])
def test_calculator_values(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr, why", [("1 / 0", "division by zero"), ("9 ** 9 ** 9", "exponent"),
                                       ("10 ** 99 * 10", "digits"), ("__import__('os')", "not allowed"),
                                       ("x + 1", "name 'x'"), ("(1,2)", "not allowed"), ("1 +", "cannot read"),
                                       ("1e308 * 10", "digits")])
def test_calculator_refuses_without_eval_or_blowup(tools, expr, why):
    result = tools["calculator"]({"expression": expr})
    assert not result.ok and why in result.error and result.content.startswith("Error: ")


def test_calculator_result_text_and_bad_arguments(tools):
    calc = tools["calculator"]
    assert calc({"expression": "6 / 3"}).content == "2"  # integer-valued: no ".0"
    assert "missing argument 'expression'" in calc({}).error
    assert "must be string" in calc({"expression": 5}).error
    assert "unknown argument 'x'" in calc({"expression": "1", "x": 2}).error


# -- python (sandboxed subprocess) --------------------------------------------------------------
def test_python_runs_code_like_a_cell(tools):
    r = tools["python"]({"code": "print('hi')\nx = 6\nx * 7"})
    assert r.ok and r.content == "hi\n42\n"
    r = tools["python"]({"code": "1 / 0"})
    assert not r.ok and "ZeroDivisionError" in r.content and "ZeroDivisionError" in r.error


def test_python_sandbox_limits(tools, short, tmp_path):
    """Each failure is a ToolResult(ok=False) with a reason; nothing raises."""
    spin, sleep = run_tools([ToolCall("python", {"code": "while True: pass"}, ""),          # CPU time
                             ToolCall("python", {"code": "import time; time.sleep(60)"}, "")], short)  # wall time
    assert not spin.ok and "timed out" in spin.error
    assert not sleep.ok and "timed out" in sleep.error
    outside = tmp_path / "outside.txt"
    calls = [ToolCall("python", {"code": c}, "") for c in (
        "b = bytearray(1 << 30)",                              # memory
        "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",  # network
        f"open({str(outside)!r}, 'w').write('x')",             # writes outside its directory
        "import os; print(os.getcwd())",
        "print('x' * 100_000)",                                 # output truncated
    )]
    mem, net, write, cwd, big = run_tools(calls, tools)
    assert not mem.ok and "MemoryError" in mem.error
    assert not net.ok and "network" in net.content
    assert not write.ok and not outside.exists()
    assert cwd.ok and "verl-tool-" in cwd.content
    assert big.ok and "output truncated" in big.content and len(big.content) < 3000


# -- user tools ---------------------------------------------------------------------------------
USER_TOOLS = '''
def lookup(city: str, year: int = 2020):
    """Population of a city.

    Args:
        city: the city's name
        year: census year
    """
    if city == "hang":
        while True:
            pass
    return {"city": city, "population": 100 * year}

def broken(x: str):
    """Always fails."""
    raise ValueError("no such thing")
'''


def test_user_tool_schema_call_and_failures(tmp_path):
    f = tmp_path / "my_tools.py"
    f.write_text(USER_TOOLS)
    tools = make_tools(["calculator", f"{f}:lookup", f"{f}:broken"], timeout_s=30.0, memory_mb=256)
    schema = {s["function"]["name"]: s["function"] for s in tool_schemas(tools)}["lookup"]
    assert schema["description"] == "Population of a city."
    assert schema["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city's name"},
        "year": {"type": "integer", "description": "census year"}}}
    ok, bad, unknown = run_tools([ToolCall("lookup", {"city": "Paris"}, ""), ToolCall("broken", {"x": "a"}, ""),
                                  ToolCall("search", {}, "")], tools)
    [hang] = run_tools([ToolCall("lookup", {"city": "hang"}, "")],
                       make_tools([f"{f}:lookup"], timeout_s=1.0, memory_mb=256))
    assert ok.ok and ok.content == '{"city": "Paris", "population": 202000}'
    assert not hang.ok and "timed out" in hang.error
    assert not bad.ok and "ValueError: no such thing" in bad.error
    assert not unknown.ok and "unknown tool 'search'" in unknown.error and "calculator" in unknown.error
    with pytest.raises(UserError, match="does not exist"):
        make_tools([f"{tmp_path}/nope.py:f"], timeout_s=1, memory_mb=256)
    with pytest.raises(UserError, match="unknown tool 'search'"):
        make_tools(["search"], timeout_s=1, memory_mb=256)


# -- parser -------------------------------------------------------------------------------------
def test_hermes_parser(qwen_tok):
    parser = parser_for(qwen_tok)
    assert parser.parse("The answer is 12.\n#### 12") == []
    text = ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}\n</tool_call>\n'
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expression": "1"}} and more')  # stop string cut
    a, b, c = parser.parse(text)
    assert (a.name, a.arguments, a.error) == ("calculator", {"expression": "2 * 3"}, None)
    assert (b.name, b.arguments) == ("python", {"code": "1"})
    assert (c.name, c.arguments) == ("calculator", {"expression": "1"})
    [bad] = parser.parse("<tool_call>{not json</tool_call>")
    assert bad.error and bad.name == ""
    [result] = run_tools([bad], {})
    assert not result.ok and "could not be read" in result.content


def test_parser_refuses_a_foreign_tool_format(qwen_tok):
    tok = type(qwen_tok).from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = ("{% if tools %}Environment: ipython{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
                         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="its own format"):
        parser_for(tok)


# -- rendering ----------------------------------------------------------------------------------
def test_fallback_rendering_for_a_template_without_tools(qwen_tok, tools):
    """tiny-qwen2's template ignores tools=: verl writes the tool list into the system turn and
    tool results as a <tool_response> user turn; the conversation extends token by token."""
    schemas = tool_schemas({"calculator": tools["calculator"]})
    q = [{"role": "user", "content": "What is 4821 * 377?"}]
    prompt = render_chat(qwen_tok, q, schemas, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and '"name": "calculator"' in prompt and "<tool_call>" in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is 4821 * 377?<|im_end|>\n<|im_start|>assistant\n")
    close, text = tool_turn(qwen_tok, ["1817517"], schemas)
    assert close == "<|im_end|>\n"
    assert text == "<|im_start|>user\n<tool_response>\n1817517\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "4821 * 377"}}\n</tool_call>'
    convo = q + [{"role": "assistant", "content": call}, {"role": "tool", "content": "1817517"}]
    assert render_chat(qwen_tok, convo, schemas, add_generation_prompt=True) == prompt + call + close + text


def test_native_hermes_template_is_used_as_is(qwen_tok, tools):
    tok = type(qwen_tok).from_pretrained(qwen_tok.name_or_path)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> "
        "Call as <tool_call>{}</tool_call><|im_end|>\n{% endif %}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    schemas = tool_schemas(tools)
    q = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, q, schemas, add_generation_prompt=True) == tok.apply_chat_template(
        q, tools=schemas, tokenize=False, add_generation_prompt=True)
    assert parser_for(tok).source == "hermes"
