from sdbridge.bridge.oscquery import OscQueryServer, find, namespace
from sdbridge.params import Schema


def test_namespace_from_the_schema():
    schema = Schema()
    tree = namespace(schema, {"strength": 0.25}, prefix="/sd")
    strength = find(tree, "/sd/strength")
    assert strength["FULL_PATH"] == "/sd/strength" and strength["TYPE"] == "f"
    assert strength["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}] and strength["VALUE"] == [0.25]
    assert find(tree, "/sd/resize_mode")["RANGE"] == [{"VALS": ["crop", "fit", "stretch"]}]
    assert find(tree, "/sd/seed")["TYPE"] == "i"
    assert find(tree, "/sd")["FULL_PATH"] == "/sd" and find(tree, "/nope") is None
    def leaves(node):
        return sum(leaves(child) for child in node["CONTENTS"].values()) if "CONTENTS" in node else 1

    assert leaves(find(tree, "/sd")) == len(schema)
    assert find(tree, "/sd/lfo1/target")["TYPE"] == "s"


def test_responses():
    server = OscQueryServer(Schema(), lambda: {"strength": 0.5}, "/sd", "127.0.0.1", 9000)
    assert server.respond("GET", "/?HOST_INFO")[1]["OSC_PORT"] == 9000
    assert server.respond("GET", "/sd/strength?VALUE") == (200, {"VALUE": [0.5]})
    assert server.respond("GET", "/sd/nope")[0] == 404
    assert server.respond("POST", "/")[0] == 405
