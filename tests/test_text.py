from __future__ import annotations

import pytest

from blip_ops.text import TextSettings, normalize_text


def test_chinese_becomes_pinyin_and_runs_are_separated():
    assert normalize_text("儿童滑行车") == "er tong hua xing che"
    assert normalize_text("简约Sofa") == "jian yue sofa"
    assert normalize_text("M & D 简约现代 轻奢 Sofa TE04") == "m & d jian yue xian dai qing she sofa te04"


def test_whitespace_case_and_fullwidth():
    assert normalize_text("  Light\tLuxury \n SOFA  ") == "light luxury sofa"
    # NFKC folds full-width letters, digits and spaces (common in Chinese listings).
    assert normalize_text("ＴＥ０４　Sofa") == "te04 sofa"


def test_settings_are_honoured():
    keep = TextSettings(lowercase=False, to_pinyin=False)
    assert normalize_text("Red 沙发", keep) == "Red 沙发"
    assert normalize_text("x" * 2000, TextSettings(max_chars=10)) == "x" * 10


def test_pinyin_input_is_left_alone():
    title = "er tong hua xing che fang ce fan niu niu che 1-3 sui"
    assert normalize_text(title) == title


def test_rejects_non_text():
    with pytest.raises(TypeError, match="got bytes"):
        normalize_text(b"sofa")


def test_settings_round_trip_and_unknown_keys():
    s = TextSettings(max_length=20)
    assert TextSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown text settings"):
        TextSettings.from_dict({"max_len": 3})
