"""The manifest schema: every key valid and invalid, bounds, host:port forms, paths, JSON."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from helpers import base_manifest, sha256

from forgeone_isolate import manifest as mf
from forgeone_isolate.errors import EXIT_BAD_INPUT, ManifestError
from forgeone_isolate.semver import Version

WASM_DIGEST = sha256(b"wasm")


def full_manifest() -> dict[str, Any]:
    obj = base_manifest()
    obj["files"] = {"plugin.wasm": WASM_DIGEST}
    return obj


def parse(obj: Any) -> mf.Manifest:
    return mf.parse_manifest(json.dumps(obj).encode())


def with_value(path: str, value: Any) -> dict[str, Any]:
    """A full manifest with the key at ``path`` ('limits/pids') set (or removed if ...)."""
    obj = full_manifest()
    *parents, last = path.split("/")
    target: Any = obj
    for p in parents:
        target = target[p]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return obj


def refused(obj: Any, expect: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(obj)
    assert expect in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_status == EXIT_BAD_INPUT


def test_full_manifest_parses_to_typed_fields() -> None:
    m = parse(full_manifest())
    assert m.name == "sample"
    assert m.version == Version(1, 0, 0)
    assert m.abi == 1
    assert m.entry == "plugin.wasm"
    assert dict(m.files) == {"plugin.wasm": WASM_DIGEST}
    assert m.permissions == mf.Permissions()
    assert m.limits == mf.Limits(16, 50, 4, 1048576, 1000000, 10)
    assert m.dependencies == {}
    assert m.raw == json.dumps(full_manifest()).encode()


def test_as_dict_round_trips() -> None:
    obj = full_manifest()
    obj["permissions"] = {
        "fs.read": ["/data"],
        "fs.write": ["/tmp/out"],
        "net.connect": ["example.com:443", "[2001:db8::1]:8443"],
        "kv": True,
        "config": ["db.url"],
    }
    obj["dependencies"] = {"other": "^1.2.0"}
    m = parse(obj)
    assert m.as_dict() == obj
    assert parse(m.as_dict()).as_dict() == obj


def test_optional_sections_take_defaults() -> None:
    obj = full_manifest()
    del obj["permissions"], obj["limits"]
    m = parse(obj)
    assert m.permissions == mf.Permissions()
    assert m.limits == mf.Limits()
    assert m.limits.as_dict() == {k: v[2] for k, v in mf.LIMIT_BOUNDS.items()}


def test_canonical_bytes_are_sorted_indented_ascii_with_newline() -> None:
    data = mf.canonical_bytes({"b": 1, "a": "é"})
    assert data == b'{\n  "a": "\\u00e9",\n  "b": 1\n}\n'


# ---------------------------------------------------------------- top level


@pytest.mark.parametrize("key", ["name", "version", "abi", "entry", "files"])
def test_required_keys(key: str) -> None:
    refused(with_value(key, ...), f"missing required key {key!r}")


def test_files_optional_for_pack() -> None:
    obj = full_manifest()
    del obj["files"]
    m = mf.parse_manifest(json.dumps(obj).encode(), require_files=False)
    assert m.files == {}


@pytest.mark.parametrize("key", ["exec", "Name", "signature", "permission"])
def test_unknown_top_level_keys(key: str) -> None:
    obj = full_manifest()
    obj[key] = 1
    refused(obj, f"unknown key {key!r}")


@pytest.mark.parametrize("top", [[], "manifest", 1, None, True])
def test_top_level_must_be_an_object(top: Any) -> None:
    refused(top, "top level must be a JSON object")


# --------------------------------------------------------------------- name


@pytest.mark.parametrize("name", ["a", "0", "hello", "a-b.c_d", "x" * 64, "9lives"])
def test_valid_names(name: str) -> None:
    assert parse(with_value("name", name)).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Hello", "-a", ".a", "_a", "a b", "x" * 65, "a/b", "hello\n", "héllo", 1, None, ["a"]],
)
def test_invalid_names(name: Any) -> None:
    refused(with_value("name", name), "'name' must be")


# ------------------------------------------------------------------ version


@pytest.mark.parametrize("version", ["0.0.0", "1.2.3", "1.0.0-rc.1", "1.0.0+build.5"])
def test_valid_versions(version: str) -> None:
    assert str(parse(with_value("version", version)).version) == version


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0\n", "1.0.0-", ""])
def test_invalid_versions(version: str) -> None:
    refused(with_value("version", version), "'version': not a semantic version")


@pytest.mark.parametrize("version", [1, 1.0, None, ["1.0.0"]])
def test_version_must_be_a_string(version: Any) -> None:
    refused(with_value("version", version), "'version' must be a string")


# ---------------------------------------------------------------------- abi


@pytest.mark.parametrize("abi", ["1", 1.0, True, None, [1]])
def test_abi_must_be_an_integer(abi: Any) -> None:
    refused(with_value("abi", abi), "'abi' must be an integer")


@pytest.mark.parametrize("abi", [0, 2, -1, 10**20])
def test_unsupported_abi(abi: int) -> None:
    refused(with_value("abi", abi), f"unsupported ABI version {abi}")


# -------------------------------------------------------------------- entry


def test_entry_in_a_subdirectory() -> None:
    obj = with_value("entry", "bin/plugin.wasm")
    obj["files"] = {"bin/plugin.wasm": WASM_DIGEST}
    assert parse(obj).entry == "bin/plugin.wasm"


@pytest.mark.parametrize(
    "entry",
    ["plugin.wat", "/plugin.wasm", "../plugin.wasm", ".plugin.wasm", "a//b.wasm", "p.wasm\n", 5],
)
def test_invalid_entries(entry: Any) -> None:
    refused(with_value("entry", entry), "'entry' must be a relative member path ending in .wasm")


def test_entry_must_be_listed_in_files() -> None:
    refused(with_value("entry", "other.wasm"), "entry 'other.wasm' is not listed in 'files'")


# -------------------------------------------------------------------- files


def test_files_with_several_members() -> None:
    files = {"plugin.wasm": WASM_DIGEST, "data/a.txt": sha256(b"a"), "_x/y-z.bin": sha256(b"")}
    assert dict(parse(with_value("files", files)).files) == files


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        ([], "'files' must be an object"),
        ("plugin.wasm", "'files' must be an object"),
        ({}, "'files' is empty"),
        ({"../x": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "bad path '../x'"),
        ({"/etc/x": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "bad path '/etc/x'"),
        ({"a\\b": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "bad path"),
        ({"x\n": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "bad path"),
        ({"manifest.json": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "may not list"),
        ({"manifest.sig": WASM_DIGEST, "plugin.wasm": WASM_DIGEST}, "may not list"),
        ({"plugin.wasm": WASM_DIGEST.upper()}, "needs a lowercase hex sha256"),
        ({"plugin.wasm": WASM_DIGEST[:-1]}, "needs a lowercase hex sha256"),
        ({"plugin.wasm": WASM_DIGEST + "\n"}, "needs a lowercase hex sha256"),
        ({"plugin.wasm": 1}, "needs a lowercase hex sha256"),
        ({"plugin.wasm": None}, "needs a lowercase hex sha256"),
    ],
)
def test_invalid_files(files: Any, expect: str) -> None:
    refused(with_value("files", files), expect)


def test_files_bound() -> None:
    files = {f"f{i}.bin": WASM_DIGEST for i in range(mf.MAX_FILES - 1)}
    files["plugin.wasm"] = WASM_DIGEST
    assert len(parse(with_value("files", files)).files) == mf.MAX_FILES
    files["one-more.bin"] = WASM_DIGEST
    refused(with_value("files", files), f"more than {mf.MAX_FILES}")


# -------------------------------------------------------------- permissions


def test_permissions_must_be_an_object() -> None:
    refused(with_value("permissions", ["kv"]), "'permissions' must be an object")


@pytest.mark.parametrize("key", ["fs.exec", "net.listen", "fs", "KV"])
def test_unknown_permission(key: str) -> None:
    refused(with_value(f"permissions/{key}", []), f"unknown permission {key!r}")


@pytest.mark.parametrize("key", ["fs.read", "fs.write"])
@pytest.mark.parametrize("path", ["/", "/data", "/var/lib/plugin-data", "/a b/c", "/..x/y."])
def test_valid_abs_paths(key: str, path: str) -> None:
    perms = parse(with_value(f"permissions/{key}", [path])).permissions
    assert getattr(perms, key.replace(".", "_")) == (path,)


@pytest.mark.parametrize("key", ["fs.read", "fs.write"])
@pytest.mark.parametrize(
    "path",
    ["data", "", "./data", "/data/", "//data", "/a//b", "/a/./b", "/a/../b", "/..", "/.", "/a\0b"],
)
def test_paths_must_be_normalised_absolute(key: str, path: str) -> None:
    refused(with_value(f"permissions/{key}", [path]), "is not a normalised absolute path")


def test_abs_path_length_bound() -> None:
    assert mf.check_abs_path("/" + "a" * 4095, "x") == "/" + "a" * 4095
    with pytest.raises(ManifestError, match="normalised absolute path"):
        mf.check_abs_path("/" + "a" * 4096, "x")


@pytest.mark.parametrize("key", ["fs.read", "fs.write", "net.connect", "config"])
@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("/data", "must be a list of strings"),
        ([1], "must be a list of strings"),
        ([None], "must be a list of strings"),
        ({"a": 1}, "must be a list of strings"),
        (True, "must be a list of strings"),
    ],
)
def test_permission_lists_are_lists_of_strings(key: str, value: Any, expect: str) -> None:
    refused(with_value(f"permissions/{key}", value), f"'permissions.{key}' {expect}")


@pytest.mark.parametrize(
    ("key", "item"),
    [("fs.read", "/d"), ("fs.write", "/d"), ("net.connect", "a.b:1"), ("config", "k")],
)
def test_permission_lists_refuse_duplicates(key: str, item: str) -> None:
    refused(with_value(f"permissions/{key}", [item, item]), "lists an entry twice")


def test_permission_list_bound() -> None:
    ok = [f"/d{i}" for i in range(mf.MAX_LIST)]
    assert len(parse(with_value("permissions/fs.read", ok)).permissions.fs_read) == mf.MAX_LIST
    refused(with_value("permissions/fs.read", [*ok, "/one-more"]), f"more than {mf.MAX_LIST}")


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("example.com:443", "example.com", 443),
        ("Example.COM:80", "example.com", 80),
        ("localhost:1", "localhost", 1),
        ("a-b.c-d.example:65535", "a-b.c-d.example", 65535),
        ("192.0.2.7:8080", "192.0.2.7", 8080),
        ("[::1]:443", "::1", 443),
        ("[2001:DB8:0:0:0:0:0:1]:8443", "2001:db8::1", 8443),
        ("[::ffff:192.0.2.1]:53", "::ffff:c000:201", 53),
    ],
)
def test_valid_hostports(text: str, host: str, port: int) -> None:
    assert mf.parse_hostport(text, "w") == (host, port)
    perms = parse(with_value("permissions/net.connect", [text])).permissions
    assert perms.net_connect == ((host, port),)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("example.com", "is not host:port"),
        ("example.com:", "is not host:port"),
        (":80", "is not host:port"),
        ("example.com:http", "is not host:port"),
        ("example.com:123456", "is not host:port"),
        ("example.com:-1", "is not host:port"),
        ("example.com:80\n", "is not host:port"),
        ("::1:80", "is not host:port"),
        ("[::1]", "is not host:port"),
        ("[::1]:", "is not host:port"),
        ("[fe80::1%eth0]:80", "is not host:port"),
        ("[::1]:80:80", "is not host:port"),
        ("example.com:0", "port 0 out of range"),
        ("example.com:65536", "port 65536 out of range"),
        ("[12345::1]:80", "bad IPv6 address"),
        ("[1.2.3.4]:80", "bad IPv6 address"),
        ("[1::2::3]:80", "bad IPv6 address"),
        ("-bad.example:80", "bad host name"),
        ("bad-.example:80", "bad host name"),
        ("a..b:80", "bad host name"),
        ("under_score.example:80", "bad host name"),
        ("exa mple.com:80", "bad host name"),
        ("\u212a.example:80", "bad host name"),  # Kelvin sign: lower() makes it 'k'
        ("b\u00fccher.example:80", "bad host name"),
        ("a" * 64 + ".example:80", "bad host name"),
        (".".join(["a" * 63] * 4) + ":80", "bad host name"),
    ],
)
def test_invalid_hostports(text: str, expect: str) -> None:
    with pytest.raises(ManifestError) as info:
        mf.parse_hostport(text, "permissions.net.connect")
    assert expect in str(info.value)
    refused(with_value("permissions/net.connect", [text]), expect)


@pytest.mark.parametrize(("host", "text"), [("a.b", "a.b:1"), ("::1", "[::1]:1")])
def test_format_hostport_brackets_ipv6(host: str, text: str) -> None:
    assert mf.format_hostport(host, 1) == text


@pytest.mark.parametrize("kv", [True, False])
def test_kv(kv: bool) -> None:
    assert parse(with_value("permissions/kv", kv)).permissions.kv is kv


@pytest.mark.parametrize("kv", ["true", 1, 0, None, []])
def test_kv_must_be_boolean(kv: Any) -> None:
    refused(with_value("permissions/kv", kv), "'permissions.kv' must be true or false")


@pytest.mark.parametrize("key", ["a", "db.url", "API_KEY", "_x", "x-y.z", "k" * 128])
def test_valid_config_keys(key: str) -> None:
    assert parse(with_value("permissions/config", [key])).permissions.config == (key,)


@pytest.mark.parametrize("key", ["", "-x", ".x", "a b", "a/b", "k" * 129, "key\n", "clé"])
def test_invalid_config_keys(key: str) -> None:
    refused(with_value("permissions/config", [key]), "'permissions.config': bad key")


# ------------------------------------------------------------------- limits


@pytest.mark.parametrize("key", sorted(mf.LIMIT_BOUNDS))
def test_limit_bounds_are_inclusive(key: str) -> None:
    low, high, _ = mf.LIMIT_BOUNDS[key]
    assert getattr(parse(with_value(f"limits/{key}", low)).limits, key) == low
    assert getattr(parse(with_value(f"limits/{key}", high)).limits, key) == high
    refused(with_value(f"limits/{key}", low - 1), f"'limits.{key}' = {low - 1} is outside")
    refused(with_value(f"limits/{key}", high + 1), f"'limits.{key}' = {high + 1} is outside")


def test_a_huge_limit_is_not_echoed_whole() -> None:
    text = json.dumps(with_value("limits/pids", 123456789)).replace("123456789", "9" * 4000)
    with pytest.raises(ManifestError) as info:
        mf.parse_manifest(text.encode())
    message = "manifest: 'limits.pids' = 999999999999…(4000 digits) is outside 1..1024"
    assert str(info.value) == message


@pytest.mark.parametrize("key", sorted(mf.LIMIT_BOUNDS))
@pytest.mark.parametrize("value", [1.0, 16.5, "16", True, None, [16]])
def test_limits_must_be_integers(key: str, value: Any) -> None:
    refused(with_value(f"limits/{key}", value), f"'limits.{key}' must be an integer")


@pytest.mark.parametrize("key", sorted(mf.LIMIT_BOUNDS))
def test_each_limit_defaults(key: str) -> None:
    assert getattr(parse(with_value(f"limits/{key}", ...)).limits, key) == mf.LIMIT_BOUNDS[key][2]


def test_unknown_limit() -> None:
    refused(with_value("limits/threads", 4), "unknown limit 'threads'")


def test_limits_must_be_an_object() -> None:
    refused(with_value("limits", [16]), "'limits' must be an object")


# ------------------------------------------------------------- dependencies


def test_dependencies() -> None:
    m = parse(with_value("dependencies", {"logger": "^1.2.0", "db": ">=2.0.0 <3.0.0 || 4.0.0"}))
    assert m.dependencies["logger"].satisfied_by(Version(1, 9, 0))
    assert not m.dependencies["logger"].satisfied_by(Version(2, 0, 0))
    assert m.dependencies["db"].satisfied_by(Version(4, 0, 0))


@pytest.mark.parametrize(
    ("deps", "expect"),
    [
        (["logger"], "'dependencies' must be an object"),
        ({"Logger": "^1.0.0"}, "bad plugin name 'Logger'"),
        ({"": "^1.0.0"}, "bad plugin name"),
        ({"sample": "^1.0.0"}, "cannot depend on itself"),
        ({"logger": 1}, "'dependencies.logger' must be a range string"),
        ({"logger": "latest"}, "'dependencies.logger': not a"),
        ({"logger": "^1.0"}, "'dependencies.logger': not a"),
        ({"logger": ""}, "'dependencies.logger': not a version range"),
        ({"logger": "^1.0.0\n>=1.0.0"}, "'dependencies.logger': not a version range"),
    ],
)
def test_invalid_dependencies(deps: Any, expect: str) -> None:
    refused(with_value("dependencies", deps), expect)


def test_dependency_bound() -> None:
    deps = {f"d{i}": "*" for i in range(mf.MAX_LIST)}
    assert len(parse(with_value("dependencies", deps)).dependencies) == mf.MAX_LIST
    deps["one-more"] = "*"
    refused(with_value("dependencies", deps), f"more than {mf.MAX_LIST} dependencies")


# --------------------------------------------------------------- JSON layer


def test_size_bound() -> None:
    obj = full_manifest()
    text = json.dumps(obj).encode()
    pad = mf.MAX_MANIFEST_BYTES - len(text)
    at_bound = text[:-1] + b" " * pad + b"}"
    assert len(at_bound) == mf.MAX_MANIFEST_BYTES
    assert mf.parse_manifest(at_bound).name == "sample"
    with pytest.raises(ManifestError, match=f"more than {mf.MAX_MANIFEST_BYTES}"):
        mf.parse_manifest(at_bound + b" ")


def test_depth_bound() -> None:
    assert mf.load_json(b"[" * mf.MAX_DEPTH + b"]" * mf.MAX_DEPTH) is not None
    with pytest.raises(ManifestError, match=f"nested deeper than {mf.MAX_DEPTH}"):
        mf.load_json(b"[" * (mf.MAX_DEPTH + 1) + b"]" * (mf.MAX_DEPTH + 1))
    with pytest.raises(ManifestError, match="nested deeper"):
        mf.load_json(b'{"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}')


@pytest.mark.parametrize("count", [100_000, 1_000_000])
def test_deep_nesting_never_reaches_the_recursive_parser(count: int) -> None:
    for opener in (b"[", b"{", b'{"a":'):
        with pytest.raises(ManifestError, match="nested deeper"):
            mf.check_depth(opener * count)
    with pytest.raises(ManifestError, match=r"nested deeper|more than"):
        mf.parse_manifest(b"[" * count)


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = "[" * 1000 + '\\"' + "{" * 1000
    assert mf.load_json(json.dumps({"a": deep_text}).encode()) == {"a": deep_text}
    assert mf.load_json(b'["\\\\", [[[[[]]]]]]') == ["\\", [[[[[]]]]]]


def test_an_escaped_quote_does_not_end_a_string() -> None:
    # if the escaped quote ended the string, the brackets after it would count
    assert mf.load_json(b'["\\"' + b"[" * 50 + b'"]') == ['"' + "[" * 50]


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"{'name': 'x'}", "not JSON"),
        (b'{"a": 1,}', "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),
        (b'{"a": "\xff"}', "not UTF-8 at byte 7"),
        (b'{"a": NaN}', "NaN is not allowed"),
        (b'{"a": Infinity}', "Infinity is not allowed"),
        (b'{"a": -Infinity}', "-Infinity is not allowed"),
        (b'{"a": 1, "a": 1}', "duplicate key 'a'"),
        (b'{"x": {"a": 1, "a": 2}}', "duplicate key 'a'"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not acceptable JSON"),
    ],
)
def test_strict_json(data: bytes, expect: str) -> None:
    with pytest.raises(ManifestError) as info:
        mf.load_json(data)
    assert expect in str(info.value)
    assert "\n" not in str(info.value)


def test_duplicate_keys_refused_in_a_full_manifest() -> None:
    text = json.dumps(full_manifest()).replace("{", '{"abi": 1, ', 1).encode()
    with pytest.raises(ManifestError, match="duplicate key 'abi'"):
        mf.parse_manifest(text)


def test_parse_keeps_the_exact_bytes() -> None:
    data = json.dumps(full_manifest(), indent=7).encode() + b"\n\n"
    assert mf.parse_manifest(data).raw == data


def test_every_error_is_one_line() -> None:
    nasty = "evil\nname\r\x1b[31m"
    for path in ["name", "entry", "permissions/config", "permissions/net.connect"]:
        value: Any = [nasty] if "/" in path else nasty
        obj = copy.deepcopy(with_value(path, value))
        with pytest.raises(ManifestError) as info:
            parse(obj)
        assert "\n" not in str(info.value)
        assert "\r" not in str(info.value)
