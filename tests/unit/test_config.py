import pytest

from sdbridge.config import Settings, is_loopback_host, load_settings
from sdbridge.errors import ConfigError


def test_defaults_are_loopback_and_a1111_port():
    settings = load_settings({}, env={})
    assert settings.host == "127.0.0.1" and settings.port == 7860 and settings.osc_port == 9000
    assert settings.is_loopback


def test_precedence_file_then_env_then_flags(tmp_path):
    config = tmp_path / "sdbridge.toml"
    config.write_text('port = 7000\nosc_port = 9100\nmodel = "from-file"\n[params]\nprompt = "a fox"\n')
    env = {"SDBRIDGE_OSC_PORT": "9200", "SDBRIDGE_MODEL": "from-env"}
    settings = load_settings({"model": "from-flag", "port": None}, env=env, config_path=config)
    assert settings.port == 7000          # file
    assert settings.osc_port == 9200      # env beats file
    assert settings.model == "from-flag"  # flag beats env
    assert settings.params == {"prompt": "a fox"}


def test_env_config_path(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sdbridge]\nport = 7100\n")
    assert load_settings({}, env={"SDBRIDGE_CONFIG": str(config)}).port == 7100


def test_public_address_requires_a_token():
    with pytest.raises(ConfigError, match="listening on --host '0.0.0.0' .*requires a token"):
        load_settings({"host": "0.0.0.0"}, env={})
    settings = load_settings({"host": "0.0.0.0", "token": "s3cret-stage-token-0123456789"}, env={})
    assert not settings.is_loopback


def test_osc_beyond_loopback_requires_a_token_too():
    # The message names the address that needs it: the OSC one here (QA: it named 127.0.0.1).
    with pytest.raises(ConfigError, match="listening on --osc-host '0.0.0.0' .*requires a token"):
        load_settings({"osc_host": "0.0.0.0"}, env={})


@pytest.mark.parametrize("text, message", [
    ("port = 'abc'\n", "port 'abc' is not an integer"),
    ("colour = 1\n", "unknown setting 'colour'"),
    # The command line's own record of what --set gave (it wins over a resumed look): no file sets it.
    ("command_line_params = ['prompt']\n", "unknown setting 'command_line_params'"),
    ("port = \n", "not valid TOML"),
    # QA 28: the command line's spelling in a file said only "unknown setting"
    ("feedback = '127.0.0.1:9000'\n", "unknown setting 'feedback': in a file it is feedback_host and feedback_port"),
    ("lora_folder = 'x'\n", "unknown setting 'lora_folder' \\(did you mean 'lora_dir'\\?\\)"),
    ("[server]\nport = 1\n", "\\[server\\] is not a table of sdbridge.toml; settings go at the top"),
    ("[osc]\nport = 1\n", "\\[osc\\] is not a table of sdbridge.toml"),   # a setting's name: 'is not a boolean
])
def test_bad_config_file(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings({}, env={}, config_path=config)


@pytest.mark.parametrize("text, message", [
    ("port = true\n", "port True is not an integer"),       # QA 15: served on port 1
    ("osc_port = false\n", "osc_port False is not an integer"),
    ("port = 17950.5\n", "port 17950.5 is not an integer"),  # was 17950
    ("feedback_hz = true\n", "feedback_hz True is not a number"),
    ('log_level = "loud"\n', "log_level 'loud' is not one of debug, info, warning, error"),
    ("feedback_hz = 0\n", "feedback_hz 0.0 not in \\(0, 240\\]"),  # QA 19: divided by zero at the first echo
    ("telemetry_hz = nan\n", "telemetry_hz nan not in \\(0, 60\\]"),  # flooded the feedback port
    ('host = "0.0.0.0"\n', "listening on --host '0.0.0.0' \\(beyond loopback\\) requires a token"),
    ("port = 99999\n", "port 99999 not in \\[0, 65535\\]"),
])
def test_config_file_values_of_the_wrong_kind_are_refused_naming_the_file(tmp_path, text, message):
    config = tmp_path / "show.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=f"^config file '{config}': {message}"):
        load_settings({}, env={}, config_path=config)
    assert load_settings({}, env={}, config_path=_written(tmp_path, "port = 7000.0\n")).port == 7000


def _written(tmp_path, text):
    path = tmp_path / "ok.toml"
    path.write_text(text)
    return path


def test_a_rule_across_settings_names_the_variable_it_came_from():
    with pytest.raises(ConfigError, match=r"^environment SDBRIDGE_PORT: port 99999 not in \[0, 65535\]"):
        load_settings({}, env={"SDBRIDGE_PORT": "99999"})
    with pytest.raises(ConfigError, match=r"^port 99999 not in"):  # a flag: the sentence alone, as before
        load_settings({"port": 99999}, env={"SDBRIDGE_PORT": "7000"})


def test_the_command_line_record_is_not_read_from_the_environment():
    settings = load_settings({"command_line_params": ["seed"]}, env={"SDBRIDGE_COMMAND_LINE_PARAMS": "prompt"})
    assert settings.command_line_params == ["seed"]
    assert load_settings({}, env={"SDBRIDGE_COMMAND_LINE_PARAMS": "prompt"}).command_line_params == []


def test_warm_sessions_from_the_environment_and_its_range():
    assert load_settings({}, env={"SDBRIDGE_WARM_SESSIONS": "4"}).warm_sessions == 4
    for bad in (0, 65):
        with pytest.raises(ConfigError, match=f"warm_sessions {bad} not in \\[1, 64\\]"):
            load_settings({"warm_sessions": bad}, env={})


def test_warm_steps_all_a_list_or_nothing():
    assert load_settings({}, env={"SDBRIDGE_WARM_STEPS": "1, 2,4"}).warm_steps == "1, 2,4"
    assert load_settings({"warm_steps": "all"}, env={}).warm_steps == "all"
    assert load_settings({}, env={}).warm_steps == ""
    for bad in ("0", "51", "1,,2", "some", "2-4"):
        with pytest.raises(ConfigError, match=f"warm_steps '{bad}' is not 'all' or a list of step counts"):
            load_settings({"warm_steps": bad}, env={})


def test_bad_env_value():
    with pytest.raises(ConfigError, match="environment SDBRIDGE_PORT"):
        load_settings({}, env={"SDBRIDGE_PORT": "seventy"})


def test_bad_osc_allow_and_prefix():
    with pytest.raises(ConfigError, match="osc_allow"):
        Settings(osc_allow=["not-a-net"]).check()
    with pytest.raises(ConfigError, match="osc_prefix"):
        Settings(osc_prefix="sd").check()


@pytest.mark.parametrize("origin", ["*", "http://例え.jp", "example.com", "http://stage.local/path", "null",
                                    "ftp://stage.local", "http://stage.local:8080 'unsafe-inline'"])
def test_an_allowed_origin_must_be_an_origin(origin):
    """It goes into the pages' frame-ancestors header too: a non-ASCII one stopped serve with a traceback and '*'
    let every site frame them (QA 36)."""
    with pytest.raises(ConfigError, match="allowed_origins entry .* is not an origin like http://host:port"):
        Settings(allowed_origins=[origin]).check()
    for good in ("http://stage.local:8080", "https://xn--r8jz45g.jp", "http://[::1]:9000/", "http://10.0.0.5"):
        Settings(allowed_origins=[good]).check()


def test_loopback_names():
    assert is_loopback_host("127.0.0.2") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("192.168.1.4")


def test_token_must_carry_128_bits():
    with pytest.raises(ConfigError, match="at least 22") as caught:
        load_settings({"host": "0.0.0.0", "token": "short-token"}, env={})
    # The command it suggests makes a token that passes (QA: it named a `sdbridge token` that does not exist).
    import re
    import subprocess
    import sys

    # In double quotes, as cmd.exe and PowerShell read them too (QA 44 F6).
    command = re.search(r'`python -c "(.+)"`', str(caught.value)).group(1)
    token = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, check=True).stdout.strip()
    assert load_settings({"host": "0.0.0.0", "token": token}, env={}).token == token


# --- hostile config files (QA 3, finding 10) ------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"port = 7000\nmodel = \"caf\xe9\"\n", "not valid TOML.*utf-8"),
    (b"\xff\xfe\x00garbage", "not valid TOML"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML.*nested too deeply"),
    (b"port = " + b"1" * 5000 + b"\n", "not valid TOML.*digits"),
    (b"port = inf\n", "port inf is not an integer"),
    (b"port = nan\n", "port nan is not an integer"),
    (b"sdbridge = 5\n", r"\[sdbridge\] must be a table"),
])
def test_a_hostile_config_file_is_one_config_error(tmp_path, content, message):
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings({}, env={}, config_path=config)
    assert "c.toml" in str(info.value) and "\n" not in str(info.value)


def test_a_config_path_that_is_a_folder_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({}, env={}, config_path=tmp_path)


@pytest.mark.parametrize("flags, env, config_text, message", [
    ({"interpolate": "5x"}, {}, None, r"^--interpolate: interpolate '5x' is not off, 1-4 or 2x-4x$"),
    ({}, {"SDBRIDGE_INTERPOLATE": "3x3"}, None,
     r"^environment SDBRIDGE_INTERPOLATE: interpolate '3x3' is not off, 1-4 or 2x-4x$"),
    ({}, {}, 'interpolate = "6x"\n', r"^config file '.*c\.toml': interpolate '6x' is not off, 1-4 or 2x-4x$"),
    ({"interpolate": " 2x"}, {}, None, r"^--interpolate: interpolate ' 2x' has spaces around it; write '2x'$"),
    ({}, {"SDBRIDGE_INTERPOLATE": "2x "}, None, r"^environment SDBRIDGE_INTERPOLATE: interpolate '2x ' has spaces"),
    ({"ice_servers": ["stun:[::1]:3478"]}, {}, None,
     r"^--ice-server: ICE server 'stun:\[::1\]:3478': aiortc takes no IPv6"),
    ({}, {"SDBRIDGE_ICE_SERVERS": "stun:a.example,stun:b.example"}, None,
     r"^environment SDBRIDGE_ICE_SERVERS: 2 STUN servers given \(stun:a.example:3478, stun:b.example:3478\)"),
    ({}, {}, 'ice_servers = ["turn:relay.example"]\n',
     r"^config file '.*c\.toml': ICE server 'turn:relay.example': a TURN server needs USER:PASSWORD@"),
])
def test_a_bad_interpolate_or_ice_server_names_where_it_came_from(tmp_path, flags, env, config_text, message):
    config = None
    if config_text is not None:
        config = tmp_path / "c.toml"
        config.write_text(config_text)
    with pytest.raises(ConfigError, match=message):
        load_settings(flags, env=env, config_path=config)


def test_interpolate_takes_any_case_from_every_source(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('interpolate = "OFF"\n')
    assert load_settings({}, env={}, config_path=config).interpolate == "OFF"
    assert load_settings({}, env={"SDBRIDGE_INTERPOLATE": "3X"}).interpolate == "3X"
    assert load_settings({"interpolate": "2X"}, env={}).interpolate == "2X"


def test_ice_servers_from_every_source():
    flagged = load_settings({"ice_servers": ["stun:stun.example:19302"]}, env={})
    assert flagged.ice_servers == ["stun:stun.example:19302"]
    both = load_settings({}, env={"SDBRIDGE_ICE_SERVERS": "stun:s.example, turn:u:p@t.example?transport=tcp"})
    assert both.ice_servers == ["stun:s.example", "turn:u:p@t.example?transport=tcp"]


# --- QA 87 ------------------------------------------------------------------------------------------


def test_a_negative_vram_budget_is_refused_naming_its_source(tmp_path):
    """F1: -5 was taken, and every engine (the CPU preview too) was then refused as over the budget."""
    with pytest.raises(ConfigError, match=r"^vram_budget_mb -5 not in \[0, 16777216\] \(megabytes; 0: no budget\)$"):
        load_settings({"vram_budget_mb": -5}, env={})
    with pytest.raises(ConfigError, match=r"^environment SDBRIDGE_VRAM_BUDGET_MB: vram_budget_mb -1 not in"):
        load_settings({}, env={"SDBRIDGE_VRAM_BUDGET_MB": "-1"})
    with pytest.raises(ConfigError, match=r"^config file '.*c\.toml': vram_budget_mb 16777217 not in"):
        load_settings({}, env={}, config_path=_written_as(tmp_path, "c.toml", "vram_budget_mb = 16777217\n"))
    assert load_settings({"vram_budget_mb": 0}, env={}).vram_budget_mb == 0
    assert load_settings({}, env={"SDBRIDGE_VRAM_BUDGET_MB": "8192"}).vram_budget_mb == 8192


def _written_as(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("flags, env, config_text, prefix", [
    ({"dtype": "fp64"}, {}, None, ""),
    ({}, {"SDBRIDGE_DTYPE": "fp64"}, None, "environment SDBRIDGE_DTYPE: "),
    ({}, {}, 'dtype = "fp64"\n', "config file '.*c\\.toml': "),
])
def test_a_dtype_typo_is_refused_at_start_naming_its_source(tmp_path, flags, env, config_text, prefix):
    """F8: it was checked only when a model loaded, where it failed every engine, the preview too."""
    config = _written_as(tmp_path, "c.toml", config_text) if config_text is not None else None
    with pytest.raises(ConfigError, match=f"^{prefix}dtype 'fp64' is not one of auto, float16, fp16, bfloat16, "
                                          "bf16, float32, fp32$"):
        load_settings(flags, env=env, config_path=config)


def test_the_dtypes_allowed_at_start_are_those_the_engines_take():
    from sdbridge.config import DTYPE_CHOICES
    from sdbridge.engines.device import DTYPES

    assert set(DTYPE_CHOICES) == {"auto", *DTYPES}
    for dtype in DTYPE_CHOICES:
        assert load_settings({"dtype": dtype}, env={}).dtype == dtype


@pytest.mark.parametrize("name, bad, allowed", [
    ("ws_impl", "foo", "wsproto, websockets-sansio, websockets"),
    ("engine", "turbo", "auto, diffusion, compiled, animatediff, preview, identity"),
])
def test_ws_impl_and_engine_from_any_source_take_the_flags_choices(tmp_path, name, bad, allowed):
    """F9: from the environment or the file they skipped the flag's choices: a bad ws_impl ended serve in a traceback
    from uvicorn, and doctor (which loads the same settings) said nothing of either."""
    variable = f"SDBRIDGE_{name.upper()}"
    with pytest.raises(ConfigError, match=f"^environment {variable}: {name} '{bad}' is not one of {allowed}$"):
        load_settings({}, env={variable: bad})
    config = _written_as(tmp_path, "c.toml", f'{name} = "{bad}"\n')
    with pytest.raises(ConfigError, match=f"^config file '.*c\\.toml': {name} '{bad}' is not one of {allowed}$"):
        load_settings({}, env={}, config_path=config)
    for good in allowed.split(", "):
        assert getattr(load_settings({}, env={variable: good}), name) == good


@pytest.mark.parametrize("text, message", [
    ("ws_max_size = 0\n", r"ws_max_size 0 is below 65536 bytes \(64 KiB, the least that holds a small frame\)"),
    ("ws_max_size = 65535\n", "ws_max_size 65535 is below 65536 bytes"),
    ("ws_ping_interval_s = -1\n", r"ws_ping_interval_s -1.0 not in \(0, 3600\] seconds"),
    ("ws_ping_timeout_s = nan\n", r"ws_ping_timeout_s nan not in \(0, 3600\] seconds"),
])
def test_websocket_limits_that_close_or_never_ping_are_refused(tmp_path, text, message):
    """F15: ws_max_size 0 closed every WebSocket at its first frame (1009, message too big); a negative or NaN
    ping interval passed too."""
    with pytest.raises(ConfigError, match=f"^config file '.*c\\.toml': {message}"):
        load_settings({}, env={}, config_path=_written_as(tmp_path, "c.toml", text))
    assert load_settings({"ws_max_size": 65536}, env={}).ws_max_size == 65536


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    """F7: Notepad and PowerShell 5 save UTF-8 with a BOM: the file was "Invalid statement (at line 1, column 1)"."""
    config = tmp_path / "bom.toml"
    config.write_bytes("\ufeffport = 7100\nmodel = \"café\"\n[params]\nprompt = \"a fox\"\n".encode())
    settings = load_settings({}, env={}, config_path=config)
    assert (settings.port, settings.model, settings.params) == (7100, "café", {"prompt": "a fox"})


def test_a_sdbridge_table_reads_the_params_and_settings_beside_it(tmp_path):
    """F6: once an [sdbridge] table was there only it was read: a [params] beside it (the layout the file's own error
    suggests: "settings go at the top or under [sdbridge], starting values under [params]") and the settings at the
    top were dropped without a word."""
    config = _written_as(tmp_path, "c.toml", 'osc_port = 9100\n[sdbridge]\nport = 7100\nengine = "identity"\n'
                                             '[params]\nprompt = "my harbour prompt"\n')
    settings = load_settings({}, env={}, config_path=config)
    assert (settings.port, settings.osc_port, settings.engine) == (7100, 9100, "identity")
    assert settings.params == {"prompt": "my harbour prompt"}
    nested = _written_as(tmp_path, "n.toml", '[sdbridge]\nport = 7100\n[sdbridge.params]\nstrength = 0.3\n')
    assert load_settings({}, env={}, config_path=nested).params == {"strength": 0.3}


@pytest.mark.parametrize("text, message", [
    ("bogus_key = 1\n[sdbridge]\nport = 7100\n", "unknown setting 'bogus_key'"),
    ("[sdbridge]\nport = 7100\n[params]\nstrength = 5.0\n", None),
    ("port = 7000\n[sdbridge]\nport = 7100\n", "'port' is set both at the top and under \\[sdbridge\\]; keep one"),
    ("[params]\nseed = 1\n[sdbridge.params]\nseed = 2\n",
     "\\[params\\] is set both at the top and under \\[sdbridge\\]; keep one"),
    ("osc_port = 9100\nosc-port = 9200\n", "'osc_port' is set twice at the top \\(as 'osc_port' and 'osc-port'\\)"),
])
def test_nothing_in_a_file_with_a_sdbridge_table_is_dropped_silently(tmp_path, text, message):
    config = _written_as(tmp_path, "c.toml", text)
    if message is None:  # read, so that doctor and serve check the starting values (strength is in [0, 1])
        assert load_settings({}, env={}, config_path=config).params == {"strength": 5.0}
        return
    with pytest.raises(ConfigError, match=f"^config file '.*c\\.toml': {message}"):
        load_settings({}, env={}, config_path=config)


def test_a_tilde_in_models_dir_is_home_from_every_source(tmp_path, monkeypatch, tiny_model_dir):
    """F4: `models list` expanded ~ in models_dir, serve and doctor did not: a model pulled to ~/mods was "not pulled
    to ~/mods" (a folder named "~") when the file or a quoted variable said models_dir = "~/mods"."""
    from pathlib import Path

    from sdbridge.engines.models import resolve_source

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "mytiny").symlink_to(tiny_model_dir)
    config = _written_as(tmp_path, "c.toml", 'models_dir = "~/mods"\nmodel = "mytiny"\n')
    for settings in (load_settings({}, env={}, config_path=config),
                     load_settings({}, env={"SDBRIDGE_MODELS_DIR": "~/mods"}),
                     load_settings({"models_dir": "~/mods"}, env={})):
        assert settings.models_dir == str(tmp_path / "mods")
        assert resolve_source("mytiny", models_dir=Path(settings.models_dir)).path == tmp_path / "mods" / "mytiny"


def test_every_path_setting_expands_a_tilde_in_one_place(tmp_path, monkeypatch):
    from sdbridge.config import PATH_SETTINGS

    monkeypatch.setenv("HOME", str(tmp_path))
    env = {f"SDBRIDGE_{name.upper()}": f"~/{name}" for name in PATH_SETTINGS}
    settings = load_settings({}, env=env)
    for name in PATH_SETTINGS:
        expected = str(tmp_path / name)
        assert getattr(settings, name) == ([expected] if name == "model_roots" else expected), name
    # Settings made in code (the daemon's tests, doctor) too, and a path without one is left as it was.
    assert Settings(presets_dir="~/p", outputs_dir="outputs").presets_dir == str(tmp_path / "p")
    assert Settings(outputs_dir="outputs").outputs_dir == "outputs"
