"""Render chat templates with transformers' own `apply_chat_template` for the Rust chat tests.

    python chat_fixtures.py --out ../../crates/videollava/tests/fixtures/chat

Writes `default_template.jinja` (the built-in Video-LLaVA template, reconstructed: see
DEFAULT_TEMPLATE below) and `cases.json`: for every (template, conversation) pair, the string
`VideoLlavaProcessor.apply_chat_template(conversation, add_generation_prompt=..., tokenize=False)`
renders (processor built on checkpoints/tiny-llama's LlamaTokenizerFast, so `bos_token`,
`eos_token`, ... are those of the tokenizer), or the message of the error it raises.
"""

import argparse
import json
import os

# The hub's chat_template.json of LanguageBind/Video-LLaVA-7B-hf is not available offline. This is
# transformers' `chat_vicuna` template from convert_llava_next_video_weights_to_hf.py with the
# `<video>` loop of the llava-hf video checkpoints added; json.dumps(indent=2) of it is 669 bytes,
# the size of the hub file (670 with the newline transformers' save_pretrained appends). It renders
# "USER: <video>\nWhy is this video funny? ASSISTANT:" as transformers' LLaVA-NeXT-Video tests expect.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] }}"
    "{% else %}"
    "{{ message['role'].upper() + ': '}}"
    "{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}"
    "{% endif %}"
)

# llava-hf/llava-1.5 style: no system role prefix, `{% generation %}` around assistant text.
LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A multi-line Vicuna-style template leaning on trim_blocks / lstrip_blocks, whitespace control,
# `raise_exception`, `loop.last`, `loop.index0`, `namespace`, string content, `strip()`,
# bos/eos tokens and an indented `{% generation %}` block.
VICUNA_STRICT = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% if messages[0]['content'] is string %}
        {% set system_message = messages[0]['content'] %}
    {% else %}
        {% set system_message = messages[0]['content'][0]['text'] %}
    {% endif %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = "A chat between a curious user and an artificial intelligence assistant." %}
{% endif %}
{{ system_message.strip() + ' ' }}
{% set ns = namespace(images=0, videos=0) %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ 'USER: ' }}
        {%- if message['content'] is string -%}
            {{ message['content'].strip() }}
        {%- else -%}
            {% for part in message['content'] %}
                {% if part['type'] == 'image' %}
                    {% set ns.images = ns.images + 1 %}
                    {{ '<image>\n' }}
                {% elif part['type'] == 'video' %}
                    {% set ns.videos = ns.videos + 1 %}
                    {{ '<video>\n' }}
                {% elif part['type'] == 'text' %}
                    {{ part['text'] | trim }}{% if not loop.last %} {% endif %}
                {% endif %}
            {% endfor %}
        {%- endif %}
        {{ ' ' }}
    {% else %}
        {{ 'ASSISTANT: ' }}
        {% generation %}
        {% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'][0]['text'] }}{% endif %}{{ eos_token }}
        {% endgeneration %}
        {% if not loop.last %}{{ ' ' }}{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- 'ASSISTANT:' -}}
{% endif %}
{% if ns.images + ns.videos > 8 %}{{ raise_exception('too many media items: ' ~ (ns.images + ns.videos)) }}{% endif %}
"""

# ChatML-style with `tojson`, `items()`, `is defined` / `is none`, `length`, `join`, `default`,
# `{%- generation -%}` whitespace control and a `break`.
CHATML_TOJSON = """{%- if tools is not none %}{{ raise_exception('tools are not supported') }}{% endif -%}
{%- for message in messages -%}
<|im_start|>{{ message.role }}
{% if message.content is string -%}
{{ message.content }}
{%- else -%}
{%- for part in message.content -%}
{%- if part.type == 'text' %}{{ part.text }}{% elif part.type == 'image' %}<image>{% else %}<{{ part.type }}>{% endif -%}
{%- endfor -%}
{%- endif %}
{%- if message.meta is defined %} {{ message.meta | tojson }}{% endif %}
<|im_end|>
{% if message.role == 'assistant' %}{%- generation -%}
{%- endgeneration %}{% endif %}
{%- endfor -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set first = m %}<first user parts: {{ m.content | length }}, {{ m.content | tojson }}>
{% break %}{% endif %}{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
{{ messages | map(attribute='role') | join(',') }}|{{ (messages | last).role | default('none') }}
"""

# Printing non-strings: jinja2 writes Python's str() of the value.
PYTHON_VALUES = (
    "{{ add_generation_prompt }}|{{ tools }}|{{ documents }}|{{ messages | length }}|{{ 2.5 }}|{{ 1e20 }}|{{ 10 // 3 }}"
    "|{{ 7 / 2 }}|{{ messages[0].content }}|{{ messages[0] }}|{{ undefined_name }}|{{ messages[-1].role | upper }}"
)

TEMPLATES = {
    "default": DEFAULT_TEMPLATE,
    "python_values": PYTHON_VALUES,
    "llava_1_5": LLAVA_15,
    "vicuna_strict": VICUNA_STRICT,
    "chatml_tojson": CHATML_TOJSON,
}

def T(text):
    return {"type": "text", "text": text}

IMG = {"type": "image"}
VID = {"type": "video"}

CONVERSATIONS = {
    "question_video": [{"role": "user", "content": [VID, T("Why is this video funny?")]}],
    "image_text": [{"role": "user", "content": [IMG, T("What is shown in this image?")]}],
    "two_images": [{"role": "user", "content": [IMG, IMG, T("What differs between these images?")]}],
    "images_and_videos_mixed_order": [
        {"role": "user", "content": [T("Compare"), VID, IMG, T("and tell me."), IMG]}
    ],
    "multi_turn": [
        {"role": "user", "content": [VID, T("What happens in the video?")]},
        {"role": "assistant", "content": [T("A child reads a book.")]},
        {"role": "user", "content": [T("Why is it funny?")]},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": [IMG, T("Describe it.")]},
        {"role": "assistant", "content": [T("A cat on a mat.")]},
    ],
    "system_message": [
        {"role": "system", "content": [T("You are a helpful assistant.")]},
        {"role": "user", "content": [IMG, T("What is this?")]},
    ],
    "unicode_and_markup": [
        {"role": "user", "content": [VID, T("Qu'est-ce que c'est ? <b>\"é\" & ünïcødé 日本語</b>\n  second line\t")]}
    ],
    "empty_text": [{"role": "user", "content": [VID, T("")]}],
    "text_only": [{"role": "user", "content": [T("Hello!")]}],
    # Content as a plain string (only through the JSON entry point on the Rust side).
    "string_content": [{"role": "user", "content": "  Hello there  "}],
    "string_content_multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
    "extra_fields": [
        {"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, T("Summarise")],
         "meta": {"lang": "fr", "note": "<é>", "n": [1, 2.5, True, None]}},
    ],
    # Errors.
    "roles_not_alternating": [
        {"role": "user", "content": [T("one")]},
        {"role": "user", "content": [T("two")]},
    ],
    "too_many_media": [{"role": "user", "content": [IMG] * 5 + [VID] * 4 + [T("all of them")]}],
}

MALFORMED = {
    "unclosed_for": "{% for message in messages %}{{ message['role'] }}",
    "unknown_tag": "{% frobnicate %}",
    "raise_always": "{{ raise_exception('This template refuses everything') }}",
}


def make_processor(ckpt):
    from transformers import (LlamaTokenizerFast, VideoLlavaImageProcessor, VideoLlavaProcessor,
                              VideoLlavaVideoProcessor)

    tok = LlamaTokenizerFast.from_pretrained(ckpt)
    return VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(),
        video_processor=VideoLlavaVideoProcessor(),
        tokenizer=tok,
        chat_template=DEFAULT_TEMPLATE,
    )


def render(proc, template, conversation, add_generation_prompt):
    try:
        out = proc.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return {"expected": out, "error": None}
    except Exception as e:  # noqa: BLE001 - the message is the fixture
        return {"expected": None, "error": f"{type(e).__name__}: {e}"}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--checkpoint",
        default=os.path.join(here, "..", "..", "crates", "videollava", "tests", "fixtures", "checkpoints", "tiny-llama"),
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import transformers

    proc = make_processor(args.checkpoint)
    tok = proc.tokenizer
    cases = []
    for tname, template in TEMPLATES.items():
        for cname, conv in CONVERSATIONS.items():
            for agp in (True, False):
                r = render(proc, template, conv, agp)
                cases.append({"template": tname, "conversation": cname, "add_generation_prompt": agp, **r})
    for tname, template in MALFORMED.items():
        r = render(proc, template, CONVERSATIONS["question_video"], True)
        cases.append({"template": tname, "conversation": "question_video", "add_generation_prompt": True, **r})

    doc = {
        "generator": "scripts/reference/chat_fixtures.py",
        "transformers": transformers.__version__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "templates": {**TEMPLATES, **MALFORMED},
        "conversations": CONVERSATIONS,
        # The same as JSON text, so readers that sort object keys still see Python's key order.
        "conversations_json": {k: json.dumps(v, ensure_ascii=False) for k, v in CONVERSATIONS.items()},
        "cases": cases,
    }
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(args.out, "default_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEFAULT_TEMPLATE)
    with open(os.path.join(args.out, "chat_template.json"), "w", encoding="utf-8") as f:
        # As transformers' save_pretrained writes it (670 bytes; 669 without the final newline).
        f.write(json.dumps({"chat_template": DEFAULT_TEMPLATE}, indent=2, sort_keys=True) + "\n")
    n_err = sum(c["error"] is not None for c in cases)
    print(f"{len(cases)} cases ({n_err} errors) -> {args.out}")


if __name__ == "__main__":
    main()
