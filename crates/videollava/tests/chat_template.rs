//! Chat-template rendering against transformers 4.57's `VideoLlavaProcessor.apply_chat_template`
//! (fixtures written by scripts/reference/chat_fixtures.py), byte for byte.

use std::path::PathBuf;

use serde_json::Value as Json;
use videollava::error::Error;
use videollava::processor::chat::{
    apply_chat_template, apply_chat_template_json, question_prompt, ChatMessage, ContentPart, DEFAULT_CHAT_TEMPLATE,
};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn fixtures() -> Json {
    let path = fixture_dir().join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The fixture's conversation as typed messages, when every content is a list of known parts
/// without extra keys (so nothing is lost in the conversion).
fn typed(conv: &Json) -> Option<Vec<ChatMessage>> {
    conv.as_array()?
        .iter()
        .map(|m| {
            let obj = m.as_object()?;
            if obj.len() != 2 {
                return None;
            }
            let parts = obj.get("content")?.as_array()?;
            if parts.iter().any(|p| p.as_object().is_none_or(|o| o.keys().any(|k| k != "type" && k != "text"))) {
                return None;
            }
            serde_json::from_value::<ChatMessage>(m.clone()).ok()
        })
        .collect()
}

#[test]
fn renders_like_transformers() {
    let fx = fixtures();
    let bos = fx["bos_token"].as_str().unwrap();
    let eos = fx["eos_token"].as_str().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() > 100, "too few cases");
    let mut typed_checked = 0;
    let mut failures = Vec::new();
    for case in cases {
        let tname = case["template"].as_str().unwrap();
        let cname = case["conversation"].as_str().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let template = fx["templates"][tname].as_str().unwrap();
        let conv = &fx["conversations"][cname];
        let label = format!("{tname}/{cname}/agp={agp}");

        let conv_json = fx["conversations_json"][cname].as_str().unwrap();
        let got_json = apply_chat_template_json(Some(template), conv_json, agp, bos, eos);
        let got_typed = typed(conv).map(|msgs| apply_chat_template(Some(template), &msgs, agp, bos, eos));
        if got_typed.is_some() {
            typed_checked += 1;
        }
        for (how, got) in std::iter::once(("json", got_json)).chain(got_typed.map(|g| ("typed", g))) {
            match (case["expected"].as_str(), case["error"].as_str(), got) {
                (Some(want), _, Ok(got)) if got == want => {}
                (Some(want), _, Ok(got)) => failures.push(format!("{label} [{how}]: got {got:?}, want {want:?}")),
                (Some(_), _, Err(e)) => failures.push(format!("{label} [{how}]: unexpected error {e}")),
                (None, Some(want), Err(e)) => {
                    let msg = e.to_string();
                    assert!(matches!(e, Error::Input(_)), "{label}: wrong error variant {e:?}");
                    assert!(!msg.contains('\n'), "{label}: error is not one line: {msg:?}");
                    // A template's own raise_exception message must come through verbatim.
                    if let Some(raised) = want.strip_prefix("TemplateError: ") {
                        if !msg.contains(raised) {
                            failures.push(format!("{label} [{how}]: error {msg:?} lacks {raised:?}"));
                        }
                    }
                }
                (None, _, Ok(got)) => {
                    failures.push(format!("{label} [{how}]: rendered {got:?}, transformers raised {}", case["error"]))
                }
                (None, None, Err(e)) => failures.push(format!("{label} [{how}]: bad fixture, error {e}")),
            }
        }
    }
    assert!(typed_checked > 60, "only {typed_checked} cases went through the typed API");
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn default_template_is_the_fixture_template() {
    let text = std::fs::read_to_string(fixture_dir().join("default_template.jinja")).unwrap();
    assert_eq!(DEFAULT_CHAT_TEMPLATE, text);
    // The chat_template.json fixture (transformers' save format) holds the same template.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("chat_template.json")).unwrap()).unwrap();
    assert_eq!(json["chat_template"].as_str().unwrap(), DEFAULT_CHAT_TEMPLATE);
}

#[test]
fn no_template_uses_the_default() {
    let fx = fixtures();
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "default" && c["conversation"] == "multi_turn" && c["add_generation_prompt"] == true)
        .unwrap();
    let msgs = typed(&fx["conversations"]["multi_turn"]).unwrap();
    let got = apply_chat_template(None, &msgs, true, "<s>", "</s>").unwrap();
    assert_eq!(got, case["expected"].as_str().unwrap());
}

#[test]
fn question_prompt_matches_the_spec() {
    let q = "Why is this video funny?";
    assert_eq!(
        question_prompt(None, q, 0, 1, "<s>", "</s>").unwrap(),
        "USER: <video>\nWhy is this video funny? ASSISTANT:"
    );
    assert_eq!(
        question_prompt(None, "Compare.", 2, 1, "<s>", "</s>").unwrap(),
        "USER: <image>\n<image>\n<video>\nCompare. ASSISTANT:"
    );
    assert_eq!(question_prompt(None, "Hi", 0, 0, "<s>", "</s>").unwrap(), "USER: Hi ASSISTANT:");
    // A checkpoint template is used when given.
    let t = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{% for p in m.content %}{{ p.type }}{% endfor %}{% endfor %}";
    assert_eq!(question_prompt(Some(t), "x", 1, 1, "<s>", "</s>").unwrap(), "<s>[user]imagevideotext");
}

#[test]
fn content_parts_serialise_as_transformers_expects() {
    let msg = ChatMessage::new("user", vec![ContentPart::Image, ContentPart::Video, ContentPart::Text("hi".into())]);
    assert_eq!(
        serde_json::to_string(&msg).unwrap(),
        r#"{"role":"user","content":[{"type":"image"},{"type":"video"},{"type":"text","text":"hi"}]}"#
    );
    let back: ChatMessage = serde_json::from_str(
        r#"{"role":"user","content":[{"type":"video","path":"a.mp4"},{"type":"text","text":"hi"}]}"#,
    )
    .unwrap();
    assert_eq!(back.content, vec![ContentPart::Video, ContentPart::Text("hi".into())]);
    assert!(serde_json::from_str::<ContentPart>(r#"{"type":"audio"}"#).is_err());
}

#[test]
fn template_errors_are_one_line_input_errors() {
    let msgs = vec![ChatMessage::user("q", 0, 1)];
    let err = apply_chat_template(
        Some("{{ raise_exception('Only user and assistant roles are supported!') }}"),
        &msgs,
        true,
        "<s>",
        "</s>",
    )
    .unwrap_err();
    assert!(matches!(err, Error::Input(_)));
    assert_eq!(err.to_string(), "chat template raised an exception: Only user and assistant roles are supported!");

    for bad in ["{% for m in messages %}", "{{ messages[0] ", "{% frobnicate %}", "{% endif %}"] {
        let err = apply_chat_template(Some(bad), &msgs, true, "<s>", "</s>").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Input(_)), "{bad}: {err:?}");
        assert!(text.starts_with("chat template: ") && !text.contains('\n'), "{bad}: {text:?}");
    }
    let err = apply_chat_template_json(None, "{\"role\": \"user\"}", true, "<s>", "</s>").unwrap_err();
    assert!(err.to_string().contains("expected a JSON list"), "{err}");
    let err = apply_chat_template_json(None, "[", true, "<s>", "</s>").unwrap_err();
    assert!(err.to_string().contains("invalid JSON"), "{err}");
}

#[test]
fn transformers_globals_and_filters() {
    let msgs = vec![ChatMessage::user("q", 0, 0)];
    let render = |t: &str| apply_chat_template(Some(t), &msgs, false, "<s>", "</s>").unwrap();
    // strftime_now gives a current year.
    let year: i32 = render("{{ strftime_now('%Y') }}").parse().unwrap();
    assert!((2024..3000).contains(&year));
    // tojson writes what json.dumps writes, options included, without HTML escaping.
    assert_eq!(
        render("{{ {'a': '<é>', 'b': [1, 2.0, none, true]} | tojson }}"),
        r#"{"a": "<é>", "b": [1, 2.0, null, true]}"#
    );
    assert_eq!(
        render("{{ {'b': 1, 'a': [1]} | tojson(indent=2, sort_keys=true) }}"),
        "{\n  \"a\": [\n    1\n  ],\n  \"b\": 1\n}"
    );
    assert_eq!(render("{{ 'é' | tojson(ensure_ascii=true) }}"), r#""\u00e9""#);
    // tools / documents are none, Python string methods work, loop controls work.
    assert_eq!(render("{{ tools is none }}{{ documents is none }}"), "TrueTrue");
    assert_eq!(render("{{ '  A b '.strip().lower() }}|{{ 'x,y'.split(',') | join('+') }}"), "a b|x+y");
    assert_eq!(render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"), "012");
    // Trailing newline of the template is dropped, as jinja2 does.
    assert_eq!(render("x\n"), "x");
}
