"""Bring-your-own-data adapters and the site config: a site's records as a Dataset, and a
bad site.toml failing at start with the value and what is accepted."""

import shutil

import numpy as np
import pytest
import torch
from deploy_harness import site_toml
from PIL import Image
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from consortia.cli import app
from consortia.client import site_status
from consortia.client.data import DataError, load_site_data
from consortia.client.join import JoinError, build_site
from consortia.client.site_config import DataSection, load_site_config
from consortia.config import ConfigError
from consortia.privacy.certs import generate_node_key, init_consortium
from consortia.privacy.dp import PrivacyLedger
from consortia.tasks import TASKS, Task, get_task, register_task

TASK = get_task("digits-mlp")


def write_csv(path, rows, header="a,b,label"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_csv_gives_float_features_and_integer_labels(tmp_path):
    path = write_csv(tmp_path / "d.csv", [[0.5, 1, 3], [2, -1.5, 0]])
    ds = load_site_data(DataSection(kind="csv", path=path), TASK)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.tolist() == [0.5, 1.0] and y.item() == 3
    assert len(ds) == 2 and ds[1][1].dtype == torch.int64


def test_the_digits_hint_gives_the_range_a_csv_must_hold(tmp_path):
    """A CSV's values reach the model as they are: the hint must state the range the
    task's own data has (0 to 1), not scikit-learn's raw 0 to 16."""
    x, _ = TASK.load_data(None).train.tensors
    path = write_csv(tmp_path / "d.csv", [[float(x.max()), 16.0, 3]])
    assert load_site_data(DataSection(kind="csv", path=path), TASK)[0][0].tolist() == [1.0, 16.0]
    assert f"{float(x.min()):g} to {float(x.max()):g}:" in TASK.records


def test_parquet_reads_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f1": [0.1, 0.2], "f2": [1.0, 2.0], "y": [1, 0]}),
                   tmp_path / "d.parquet")
    ds = load_site_data(DataSection(kind="parquet", path=tmp_path / "d.parquet",
                                    label_column="y"), TASK)
    assert len(ds) == 2 and ds[0][0].tolist() == pytest.approx([0.1, 1.0]) and ds[0][1] == 1


def test_folder_of_class_subfolders_with_arrays_and_images(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "a.npy", np.full((1, 8, 8), label, np.float32))
        Image.fromarray(np.full((8, 8), 255 * label, np.uint8)).save(tmp_path / name / "b.png")
    ds = load_site_data(DataSection(kind="folder", path=tmp_path), TASK)
    assert len(ds) == 4
    labels = sorted(int(ds[i][1]) for i in range(4))
    assert labels == [0, 0, 1, 1]
    # Channels first: a grayscale image is [1, H, W], as an image model takes it.
    assert all(ds[i][0].shape == (1, 8, 8) for i in range(4))


@pytest.mark.parametrize("make, shape", [
    (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (1, 4, 4)),  # 16-bit
    (lambda: Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).convert("P"), (3, 4, 4)),
    (lambda: Image.fromarray(np.ones((4, 4), bool)), (1, 4, 4)),  # 1-bit
])
def test_folder_images_are_scaled_to_0_1_whatever_their_mode(tmp_path, make, shape):
    """A 16-bit PNG (medical images) was divided by 255 (values up to 257), a palette PNG
    read as its palette indices, a 1-bit one as 0 to 1/255: all silently, into training."""
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        make().save(tmp_path / label / "a.png")
    ds = load_site_data(DataSection(kind="folder", path=tmp_path), TASK)
    assert ds[0][0].shape == shape and float(ds[0][0].max()) == pytest.approx(1.0)


def test_a_folder_image_of_unknown_scale_is_named(tmp_path):
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / label / "a.tiff")
        (tmp_path / label / "a.tiff").rename(tmp_path / label / "a.png")
    with pytest.raises(DataError, match=r"a.png: image mode 'F' has no known \[0, 1\] scale"):
        load_site_data(DataSection(kind="folder", path=tmp_path), TASK)


def test_hidden_folders_and_files_are_not_classes_or_records(tmp_path):
    """A Jupyter '.ipynb_checkpoints' folder sorted first and became class 0: every real
    class's label moved up by one, silently; macOS's '._b.npy' copies were read as records."""
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        np.save(tmp_path / label / "a.NPY", np.full(64, int(label), np.float32))
        (tmp_path / label / "._a.npy").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    ds = load_site_data(DataSection(kind="folder", path=tmp_path), TASK)
    assert len(ds) == 2 and [int(ds[i][1]) for i in range(2)] == [0, 1]
    assert [float(ds[i][0][0]) for i in range(2)] == [0.0, 1.0]


def test_a_folder_of_grayscale_pngs_fits_fashion_mnist_cnn(tmp_path):
    """28x28 grayscale PNGs, Fashion-MNIST's own format, were read as [28, 28]: client
    join refused them ('expected input[1, 8, 28, 28] to have 1 channels, but got 8')
    although partners.md says images are read channels first and the task takes
    [1, 28, 28]."""
    from consortia.client.data import check_records

    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(
                tmp_path / label / f"{i}.png")
    task = get_task("fashion-mnist-cnn")
    ds = load_site_data(DataSection(kind="folder", path=tmp_path), task)
    assert ds[0][0].shape == (1, 28, 28) and float(ds[0][0].max()) <= 1.0
    check_records(ds, task)


LINES = "(lines as an editor or `sed -n` counts them, the header line 1)"
ACCEPTED = ("Accepted: every feature column a finite number (e.g. 0.5, -2, 1e-3; not empty, "
            "nan or inf); 'label' (data.label_column) a class index: a whole number, 0 or more")


@pytest.mark.parametrize("rows, label, message", [
    ([[1, 2, 3]], "target", "no column 'target' (data.label_column); columns: a, b, label"),
    ([[1, 2, 3], ["x", 2, 3]], "label", f"1 bad value {LINES}: line 3, column 'a': 'x' "
                                        f"(not a number). {ACCEPTED}"),
    ([[1, 2, 0.5]], "label", "line 2, column 'label': '0.5' (not a whole number)"),
    ([[1, 2, -1]], "label", "line 2, column 'label': '-1' (negative)"),
    ([[1, "nan", 1]], "label", "line 2, column 'b': 'nan' (not a number)"),
    ([[1, 2, 1], ["-inf", 2, 1]], "label", "line 3, column 'a': '-inf' (not finite)"),
    ([[1, "", 1]], "label", "line 2, column 'b': '' (not a number)"),
    ([[1, 2, 1], [1, 2], [1, 2, 3, 4]], "label",
     f"2 bad lines {LINES}: line 3: 2 values; line 4: 4 values. Accepted: 3 comma-separated "
     "values a line, one for each header column (a, b, label)"),
])
def test_bad_csv_fails_naming_the_line_column_and_value(tmp_path, rows, label, message):
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as err:
        load_site_data(DataSection(kind="csv", path=path, label_column=label), TASK)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_csv_with_many_bad_values_names_the_first_few_and_counts_the_rest(tmp_path):
    """One read shows how much of the file is wrong, not only its first bad value; lines
    are the file's own (blank lines and a quoted value over two lines count)."""
    path = tmp_path / "d.csv"
    path.write_text('a,b,label\n1,"2\n",3\n\n' + "".join(f"{i},x,1\n" for i in range(7))
                    + "1,2,oops\n")
    with pytest.raises(DataError) as err:
        load_site_data(DataSection(kind="csv", path=path), TASK)
    assert f"8 bad values {LINES}: line 5, column 'b': 'x' (not a number); line 6" in \
        str(err.value)
    assert "line 9, column 'b': 'x' (not a number); and 3 more. Accepted" in str(err.value)


def test_a_csv_label_the_task_has_no_class_for_is_named_by_line(tmp_path):
    rows = [[0.5] * 64 + [label] for label in [1, 12, 3, 10]]
    path = write_csv(tmp_path / "d.csv", rows, ",".join(f"p{i}" for i in range(64)) + ",label")
    cfg = load_site_config(site_toml(tmp_path))
    with pytest.raises(JoinError) as err:
        build_site(cfg.model_copy(update={"data": DataSection(kind="csv", path=path)}))
    assert (f"labels must lie in [0, 9] (task 'digits-mlp' has 10 classes); found 1 to 12: "
            f"{path} has 2 such labels: line 3, column 'label': 12; line 5, column 'label': "
            "10") in str(err.value)


def test_bad_parquet_values_are_named_by_row_and_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f1": [0.1, float("nan")], "y": [1, 0]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"1 bad value \(rows counted from 1\): row 2, column "
                                        r"'f1': nan \(not a number\)"):
        load_site_data(DataSection(kind="parquet", path=tmp_path / "d.parquet",
                                   label_column="y"), TASK)


def _folder_with(tmp_path, name, data):
    for label in ("0", "1"):
        (tmp_path / "f" / label).mkdir(parents=True)
        np.save(tmp_path / "f" / label / "a.npy", np.zeros(64, np.float32))
    (tmp_path / "f" / "1" / name).write_bytes(data() if callable(data) else data)
    return DataSection(kind="folder", path=tmp_path / "f")


def _npy(array):
    def data():
        import io
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=True)
        return buf.getvalue()
    return data


@pytest.mark.parametrize("make, message", [
    (lambda t: (t / "d").mkdir() or DataSection(kind="csv", path=t / "d"),
     r"data.path: .*d cannot be read \(Is a directory\); accepted: a CSV file"),
    (lambda t: (t / "d.parquet").write_bytes(b"garbage") and
     DataSection(kind="parquet", path=t / "d.parquet"),
     r"data.path: .*d.parquet cannot be read as Parquet \(.*\); accepted: a Parquet file"),
    (lambda t: (t / "d").mkdir() or DataSection(kind="parquet", path=t / "d"),
     r"data.path: .*d is a directory; accepted: a Parquet file"),
    (lambda t: _folder_with(t, "b.npy", b"junk"), r"1/b.npy cannot be read as a record"),
    (lambda t: _folder_with(t, "b.png", b"junk"), r"1/b.png cannot be read as a record .*PNG"),
    (lambda t: _folder_with(t, "b.npy", _npy(np.array(["a", "b"]))),
     r"1/b.npy cannot be read as a record \(could not convert"),
    (lambda t: _folder_with(t, "b.npy", _npy(np.array([{}], dtype=object))),
     r"1/b.npy cannot be read as a record \(Object arrays"),
])
def test_an_unreadable_data_file_is_named_not_a_traceback(tmp_path, make, message):
    """A directory where a file belongs, a garbled Parquet file, a folder record that is
    no array or image: each was a traceback (IsADirectoryError, ArrowInvalid,
    UnidentifiedImageError, numpy's ValueError) with no word of data.path."""
    if "parquet" in message:
        pytest.importorskip("pyarrow")
    section = make(tmp_path)
    with pytest.raises(DataError, match=message):
        load_site_data(section, TASK)


def test_a_hook_returns_your_own_dataset(tmp_path, monkeypatch):
    (tmp_path / "my_site_data.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load():\n    return TensorDataset(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long))\n"
        "def bad():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(load_site_data(DataSection(kind="hook", hook="my_site_data:load"), TASK)) == 5
    with pytest.raises(DataError, match="returned int; accepted: a torch Dataset"):
        load_site_data(DataSection(kind="hook", hook="my_site_data:bad"), TASK)
    with pytest.raises(DataError, match="cannot be loaded"):
        load_site_data(DataSection(kind="hook", hook="my_site_data:missing"), TASK)


def test_a_site_toml_saved_by_a_windows_editor_loads_or_is_named(tmp_path):
    """UTF-8 with a byte order mark was 'not valid TOML: Invalid statement (at line 1,
    column 1)'; UTF-16 (Notepad's 'Unicode') a UnicodeDecodeError traceback."""
    path = site_toml(tmp_path)
    text = path.read_text()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_site_config(path).site.name == "site-a"
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"site.toml is not UTF-8 text \(invalid start byte "
                                          r"at byte 0\); accepted: a TOML file saved as UTF-8"):
        load_site_config(path)


@pytest.mark.parametrize("superlink", ["fl.example.org:9093", "203.0.113.7:9093",
                                       "[::1]:9093", "FL-1.example.org.:443"])
def test_a_superlink_address_flower_can_dial_is_accepted(tmp_path, superlink):
    path = site_toml(tmp_path, **{'superlink = "127.0.0.1:9093"': f'superlink = "{superlink}"'})
    assert load_site_config(path).site.superlink == superlink


@pytest.mark.parametrize("replace, message", [
    ({'superlink = "127.0.0.1:9093"': 'superlink = "nowhere"'},
     "site.superlink: expected host:port (e.g. fl.example.org:9093) (got 'nowhere')"),
    ({'superlink = "127.0.0.1:9093"': 'superlink = "https://fl.example.org:9093"'},
     "site.superlink: expected host:port with no scheme (e.g. fl.example.org:9093; the "
     "connection is always TLS) (got 'https://fl.example.org:9093')"),
    ({'superlink = "127.0.0.1:9093"': 'superlink = " 127.0.0.1:9093"'},
     "site.superlink: expected host:port, the host an IP address or a DNS name (e.g. "
     "fl.example.org:9093, 203.0.113.7:9093, [::1]:9093) (got ' 127.0.0.1:9093')"),
    ({'superlink = "127.0.0.1:9093"': 'superlink = "fl.example.org/x:9093"'},
     "site.superlink: expected host:port, the host an IP address or a DNS name"),
    ({'count = 3': 'count = 0'}, "data.count: Input should be greater than or equal to 1"),
    ({'index = 0': 'index = 5'}, "data.index (5) must be below data.count (3)"),
    ({'tasks = ["digits-mlp"]': 'tasks = ["fashion-mnist-cnn"]'}, "would refuse every request"),
    ({'delta = 1e-5': 'delta = 1e-5\nepsilon_budjet = 2'}, "policy.epsilon_budjet: unknown key"),
    # As the run's config: a number is finite and a value has its TOML type. An infinite
    # budget is no budget; a string is not the bool it reads as (lax pydantic took "yes").
    ({'epsilon_budget = 3.0': 'epsilon_budget = inf'},
     "policy.epsilon_budget: Input should be a finite number (got inf)"),
    ({'delta = 1e-5': 'delta = 1e-5\nmax_epsilon_if_secagg_fails = inf'},
     "policy.max_epsilon_if_secagg_fails: Input should be a finite number (got inf)"),
    ({'delta = 1e-5': 'delta = 1e-5\nrequire_dp = "yes"'},
     "policy.require_dp: Input should be a valid boolean (got 'yes')"),
    ({'delta = 1e-5': 'delta = 1e-5\nmax_rounds = "3"'},
     "policy.max_rounds: Input should be a valid integer (got '3')"),
    ({'count = 3': 'count = "3"'}, "data.count: Input should be a valid integer (got '3')"),
])
def test_a_bad_site_config_fails_at_start_naming_the_value(tmp_path, replace, message):
    with pytest.raises(ConfigError) as err:
        load_site_config(site_toml(tmp_path, **replace))
    assert message in str(err.value)


def test_missing_or_exposed_keys_fail_before_anything_starts(tmp_path):
    cfg = load_site_config(site_toml(tmp_path))
    init_consortium(tmp_path / "c", ["127.0.0.1"])
    shutil.copy(tmp_path / "c" / "ca.pem", tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="node.key not found"):
        cfg.check_files()
    generate_node_key(tmp_path)
    (tmp_path / "node.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others .*chmod 600"):
        cfg.check_files()
    (tmp_path / "node.key").chmod(0o600)
    cfg.check_files()


def test_node_key_set_to_node_pub_is_named_the_public_key_not_told_to_chmod(tmp_path):
    """keygen writes node.pub 0644: a partner who sets node_key to it is told it is the
    public half, not to chmod 600 it (and then told, after doing so, it is the wrong file)."""
    cfg = load_site_config(site_toml(tmp_path, **{'node_key = "node.key"':
                                                  'node_key = "node.pub"'}))
    init_consortium(tmp_path / "c", ["127.0.0.1"])
    shutil.copy(tmp_path / "c" / "ca.pem", tmp_path / "ca.pem")
    generate_node_key(tmp_path)
    assert (tmp_path / "node.pub").stat().st_mode & 0o077  # as keygen leaves it
    with pytest.raises(ConfigError) as err:
        cfg.check_files()
    assert "is a public key (node.pub?), not the private half" in str(err.value)
    assert "chmod" not in str(err.value)


def test_an_expired_ca_fails_at_start_unless_the_bundle_holds_a_valid_one(tmp_path):
    """An expired ca.pem started a SuperNode whose every TLS handshake then failed."""
    import datetime as dt

    from deploy_harness import resign

    cfg = load_site_config(site_toml(tmp_path))
    generate_node_key(tmp_path)
    now = dt.datetime.now(dt.UTC)
    fresh, old = init_consortium(tmp_path / "c", ["127.0.0.1"]), init_consortium(
        tmp_path / "old", ["127.0.0.1"])
    resign(old, "ca.pem", now - dt.timedelta(days=3660), now - dt.timedelta(days=3))
    shutil.copy(old / "ca.pem", tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"site.ca_cert: .*ca.pem expired on .* UTC, and TLS "
                                          r"refuses an expired certificate; ask the operator "
                                          r"for the consortium's current ca.pem"):
        cfg.check_files()
    (tmp_path / "ca.pem").write_bytes((old / "ca.pem").read_bytes()
                                      + (fresh / "ca.pem").read_bytes())
    cfg.check_files()


@pytest.mark.parametrize("setting, bad, message", [
    # The SuperNode would wait forever on a CA it cannot read, saying so only in its log.
    ("ca_cert", "not a certificate\n", "site.ca_cert: {path} is not a PEM certificate; "
                                       "accepted: one or more -----BEGIN CERTIFICATE-----"),
    # ... and restart forever (exit 302) on a key it cannot parse.
    ("node_key", "node.pub", "site.node_key: {path} is a public key (node.pub?), not the "
                             "private half; accepted: node.key from `consortia certs keygen`"),
    ("node_key", "c/server.key", "site.node_key: {path} is not an unencrypted OpenSSH private "
                                 "key"),
    ("node_key", "not a key\n", "site.node_key: {path} is not an unencrypted OpenSSH"),
])
def test_client_join_fails_at_start_on_a_file_the_supernode_cannot_use(tmp_path, monkeypatch,
                                                                        setting, bad, message):
    from consortia.client import join

    def started(*args):
        raise AssertionError("a SuperNode was started with a file it cannot use")

    monkeypatch.setattr(join, "SuperNodeProcess", started)
    init_consortium(tmp_path / "c", ["127.0.0.1"])
    shutil.copy(tmp_path / "c" / "ca.pem", tmp_path / "ca.pem")
    generate_node_key(tmp_path)
    path = tmp_path / f"bad-{setting}"
    if (tmp_path / bad).is_file():
        shutil.copy(tmp_path / bad, path)
    else:
        path.write_text(bad)
    path.chmod(0o600)
    config = site_toml(tmp_path, **{f'{setting} = "': f'{setting} = "bad-{setting}" # '})
    result = CliRunner().invoke(app, ["client", "join", "--config", str(config)])
    assert result.exit_code == 2
    assert message.format(path=path) in " ".join(result.output.split())


def test_your_own_task_and_dataset_through_the_python_api(tmp_path):
    mine = Task(name="my-mlp", description="a partner's own model",
                build_model=lambda activation="tanh": torch.nn.Linear(64, 10),
                load_data=TASK.load_data)
    try:
        register_task(mine)
        cfg = load_site_config(site_toml(tmp_path, task="my-mlp"))
        data = torch.utils.data.TensorDataset(torch.rand(7, 64), torch.zeros(7, dtype=torch.long))
        site = build_site(cfg, dataset=data)
        assert site.task is mine and len(site.dataset) == 7 and site.client_id == "site-a"
        assert oct(site.state_dir.stat().st_mode & 0o777) == "0o700"
        status = site_status(cfg)
        assert status["epsilon"] == 0 and status["epsilon_budget"] == 3.0 and status["audit"] == []
    finally:
        TASKS.pop("my-mlp", None)
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task(name="digits-mlp", description="", build_model=None, load_data=None))


def test_empty_data_fails_at_start(tmp_path):
    cfg = load_site_config(site_toml(tmp_path))
    empty = cfg.model_copy(update={"data": DataSection(kind="hook", hook="builtins:list")})
    with pytest.raises(JoinError, match="empty"):
        build_site(empty)


def test_client_status_prints_the_sites_own_records(tmp_path):
    path = site_toml(tmp_path)
    result = CliRunner().invoke(app, ["client", "status", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "site-a: ε 0.0000 of 3.0" in result.output


@pytest.mark.parametrize("ledger, message", [
    (lambda state: (state / "privacy_ledger.json").write_text("xx"),
     "it holds this client's privacy spend, so the client trains nothing until it is restored"),
    (lambda state: PrivacyLedger.open(state, accountant="rdp", delta=1e-6,
                                      epsilon_budget=3.0).save(),
     "was kept with accountant='rdp', delta=1e-06; this run asks for accountant='rdp', "
     "delta=1e-05"),
])
def test_client_status_says_why_it_cannot_read_the_ledger(tmp_path, ledger, message):
    """client join stops on such a ledger with the reason; client status was a traceback
    (LedgerMismatchError), the one command a partner has to look at it."""
    path = site_toml(tmp_path)
    (tmp_path / "state").mkdir()
    ledger(tmp_path / "state")
    result = CliRunner().invoke(app, ["client", "status", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: this site's privacy ledger: ")
    assert message in " ".join(result.output.split())


def test_a_state_dir_that_is_a_file_fails_join_naming_the_setting(tmp_path):
    (tmp_path / "state").write_text("not a folder")  # was FileExistsError's traceback
    with pytest.raises(JoinError, match=r"site.state_dir: .*state cannot be used as this "
                                        r"site's state directory \(File exists\)"):
        build_site(load_site_config(site_toml(tmp_path)))


def test_client_status_reads_an_audit_log_with_a_line_cut_short(tmp_path):
    """A crash mid-append leaves a cut line; client status was a JSONDecodeError traceback."""
    path = site_toml(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "audit.jsonl").write_text(
        '{"time": 1, "run": "r", "round": 1, "asked": {}, "decision": "trained", "reason": ""}\n'
        '{"time": 2, "run": "r", "round": 2, "deci')
    result = CliRunner().invoke(app, ["client", "status", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning: audit.jsonl line(s) 2 cannot be read" in result.output
    assert "run r round 1: trained" in result.output


def test_a_hook_beside_site_toml_loads_as_partners_md_shows_it(tmp_path, monkeypatch):
    """partners.md's hook (my_site/data.py beside site.toml, hook = "my_site.data:load")
    failed under `consortia client join` with "No module named 'my_site'": a console
    script has no working directory on sys.path. The folder of site.toml is importable,
    as its relative paths are read from it (task_modules too)."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir("/")
    package = tmp_path / "my_site_beside"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "data.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n\n\ndef load():\n"
        "    return TensorDataset(torch.rand(20, 64), torch.randint(0, 10, (20,)))\n")
    (package / "tasks.py").write_text("LOADED = True\n")
    path = site_toml(tmp_path, extra='task_modules = ["my_site_beside.tasks"]', **{
        'kind = "partition"\nindex = 0\ncount = 3': 'kind = "hook"\nhook = "my_site_beside.data:load"'})
    site = build_site(load_site_config(path))
    assert len(site.dataset) == 20 and sys.modules["my_site_beside.tasks"].LOADED


def test_the_policy_cap_on_the_fallback_epsilon_reaches_the_site(tmp_path):
    path = site_toml(tmp_path, **{'delta = 1e-5': 'delta = 1e-5\nmax_epsilon_if_secagg_fails = 12.5'})
    site = build_site(load_site_config(path))
    assert site.privacy.max_epsilon_if_secagg_fails == 12.5


class DictRecords(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.zeros(64), "y": 0}


def records(n=20, width=64, features=torch.float32, labels=torch.int64, top=10):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, width, generator=gen).to(features),
                         torch.randint(0, top, (n,), generator=gen).to(labels))


class OwnRecords(torch.utils.data.Dataset):
    """A partner's own Dataset class (not a TensorDataset): record 50's label is 12."""

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return torch.zeros(64), 12 if i == 50 else i % 10


class RaggedRecords(OwnRecords):
    """Record 30's features are [63], the others' [64]."""

    def __getitem__(self, i):
        return torch.zeros(63 if i == 30 else 64), i % 10


def bad_label_at(i, n=60):
    data = records(n=n)
    data.tensors[1][i] = 12
    return data


@pytest.mark.parametrize(("dataset", "message"), [
    (records(top=12), "labels must lie in [0, 9] (task 'digits-mlp' has 10 classes); found"),
    (records(width=7), "do not fit task 'digits-mlp''s model: RuntimeError: mat1 and mat2"),
    (records(features=torch.float64), "do not fit task 'digits-mlp''s model: RuntimeError"),
    (records(labels=torch.float32), "labels must be class indices (int64), got torch.float32"),
    (DictRecords(), "each record must be a tuple; record 0 is a dict; task 'digits-mlp' takes "
                    "records (features, label): features float32 of shape [64]"),
    (records(n=0), "the site's dataset is empty"),
    # beyond the 8 records put through the model, in any Dataset, not only a TensorDataset
    (OwnRecords(), "has 10 classes); found 0 to 12: 1 record (counted from 0): record 50: 12"),
    (torch.utils.data.Subset(bad_label_at(40), range(10, 60)),
     "found 0 to 12: 1 record (counted from 0): record 30: 12"),
    (torch.utils.data.ConcatDataset([records(), bad_label_at(15, n=30)]),
     "found 0 to 12: 1 record (counted from 0): record 35: 12"),
    # a record of another shape beyond those 8 failed training at its batch ("stack expects
    # each tensor to be equal size")
    (RaggedRecords(), "record 30 (counted from 0) has shapes [(63,), ()], record 0 has "
                      "[(64,), ()]; accepted: records of one shape (a batch stacks them)"),
])
def test_a_partners_own_dataset_that_does_not_fit_the_task_fails_at_start(tmp_path, dataset,
                                                                         message):
    cfg = load_site_config(site_toml(tmp_path))
    with pytest.raises(JoinError) as err:
        build_site(cfg, dataset)
    assert message in str(err.value)
    assert build_site(cfg, records()).dataset is not None  # one that fits joins


def test_without_a_data_section_the_dataset_comes_from_the_python_api(tmp_path):
    path = site_toml(tmp_path)
    text = path.read_text()
    path.write_text(text[:text.index("[data]")] + text[text.index("[policy]"):])
    cfg = load_site_config(path)
    assert cfg.data is None
    with pytest.raises(JoinError, match=r"no \[data\] section: give one, or pass your Dataset"):
        build_site(cfg)
    assert len(build_site(cfg, records()).dataset) == 20


@pytest.mark.parametrize("name", ["digits-mlp", "fashion-mnist-cnn", "reviews-minilm-lora",
                                  "shakespeare-smollm2-lora"])
def test_every_built_in_tasks_own_records_pass_the_start_check(name):
    """Records are whatever the task's forward takes: (features, label), (ids, mask,
    label) for the reviews, (ids, mask) for next-token prediction."""
    from consortia.client.data import check_records
    from consortia.tasks import get_task

    task = get_task(name)
    try:
        train = task.load_data(None).train
    except FileNotFoundError as err:  # Fashion-MNIST is a Debian package (make installs it)
        pytest.skip(str(err))
    check_records(torch.utils.data.Subset(train, range(16)), task)


def test_a_text_task_given_feature_label_pairs_says_what_its_records_are(tmp_path):
    """A partner who gives the reviews task (ids, label) pairs, as for a tabular task, is
    told the task's own record format, not the tabular one."""
    from consortia.client.data import DataError, check_records
    from consortia.tasks import get_task

    task = get_task("reviews-minilm-lora")
    pairs = TensorDataset(torch.randint(0, 1000, (8, 16)), torch.zeros(8, dtype=torch.long))
    with pytest.raises(DataError) as err:
        check_records(pairs, task)
    assert "takes records (input_ids, attention_mask, label)" in str(err.value)
    assert "float32" not in str(err.value)


def test_privacy_terms_that_protect_nothing_fail_when_the_site_joins(tmp_path):
    # δ at or above 1/n: the ε beside it means nothing for this site's 7 records.
    data = TensorDataset(torch.rand(7, 64), torch.zeros(7, dtype=torch.long))
    cfg = load_site_config(site_toml(tmp_path, **{"delta = 1e-5": "delta = 0.2"}))
    with pytest.raises(JoinError, match=r"\[policy\] delta = 0.2 is not below 1/n for site "
                                        r"'site-a''s 7 records"):
        build_site(cfg, dataset=data)
    # A model Opacus cannot make private (BatchNorm mixes the records of a batch).
    bn = Task(name="bn-mlp", description="", load_data=TASK.load_data,
              build_model=lambda activation="tanh": torch.nn.Sequential(
                  torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 10)))
    try:
        register_task(bn)
        cfg = load_site_config(site_toml(tmp_path, task="bn-mlp"))
        with pytest.raises(JoinError, match="cannot be trained with DP: .*BatchNorm.*GroupNorm"
                           ) as err:
            build_site(cfg, dataset=TensorDataset(torch.rand(16, 64),
                                                  torch.zeros(16, dtype=torch.long)))
        # the site's own setting, not a run config's privacy.enabled (site.toml has none)
        assert str(err.value).endswith("or train without DP ([policy] require_dp = false in "
                                       "site.toml, for runs without DP only)")
        # A site that does not require DP may serve it (a run without DP).
        lax = load_site_config(site_toml(tmp_path, task="bn-mlp",
                                         **{"delta = 1e-5": "delta = 1e-5\nrequire_dp = false"}))
        build_site(lax, dataset=TensorDataset(torch.rand(16, 64), torch.zeros(16, dtype=torch.long)))
    finally:
        TASKS.pop("bn-mlp", None)


def test_a_missing_model_package_is_said_at_join_not_as_a_traceback(tmp_path):
    from consortia.tasks.adapters import MissingPackage

    def build_model(activation="tanh"):
        raise MissingPackage("the my-llm task's model needs the Python package 'llm-x==1.0', "
                             "which is not installed")

    try:
        register_task(Task(name="my-llm", description="", build_model=build_model,
                           load_data=TASK.load_data))
        cfg = load_site_config(site_toml(tmp_path, task="my-llm"))
        with pytest.raises(JoinError, match="needs the Python package 'llm-x==1.0'"):
            build_site(cfg, dataset=TensorDataset(torch.rand(4, 64), torch.zeros(4, dtype=torch.long)))
    finally:
        TASKS.pop("my-llm", None)


def test_client_status_on_a_state_dir_that_is_a_file_names_the_setting(tmp_path):
    """client status with site.state_dir a file printed 'ε 0.0000 of …' as if the site had
    never trained; a state_dir not made yet still reads as a site that never joined."""
    path = site_toml(tmp_path)
    assert site_status(path)["epsilon"] == 0  # no state yet: nothing spent
    (tmp_path / "state").write_text("not a folder")
    result = CliRunner().invoke(app, ["client", "status", "--config", str(path)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "site.state_dir:" in said and "is a file" in said and "ε" not in said
    with pytest.raises(ConfigError, match="is a file"):
        site_status(path)


def test_join_federation_with_a_task_not_the_sites_task_fails_naming_both(tmp_path, monkeypatch):
    """join_federation(task=mine) registered `mine` and joined as site.toml's task: a
    partner whose site.task still named digits-mlp trained digits-mlp's model, not theirs,
    without a word (its records fitting both)."""
    from consortia.client import join, join_federation

    def started(*args):
        raise AssertionError("the site joined with another task than the one it was given")

    monkeypatch.setattr(join, "SuperNodeProcess", started)
    mine = Task(name="my-own-mlp", description="a partner's own model",
                build_model=lambda activation="tanh": torch.nn.Linear(64, 10),
                load_data=TASK.load_data)
    try:
        with pytest.raises(JoinError) as err:
            join_federation(site_toml(tmp_path), dataset=records(), task=mine)
    finally:
        TASKS.pop("my-own-mlp", None)
    assert str(err.value) == (
        "join_federation(task=...): your task is named 'my-own-mlp', but site.task is "
        "'digits-mlp', the task this site trains; accepted: a task named as site.task (or "
        "site.task = 'my-own-mlp', listed in policy.tasks)")


def test_an_own_task_with_its_own_loss_takes_float_targets_at_join(tmp_path):
    """Task's docs: override criterion / train_step for a loss other than cross-entropy.
    A binary task (one logit, BCEWithLogitsLoss, float targets) was refused at join with
    "labels must be class indices (int64), got torch.float32", a rule of the default loss."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class BinaryTask(Task):
        def criterion(self):
            return torch.nn.BCEWithLogitsLoss()

        def forward(self, model, batch, device):
            x, y = (t.to(device) for t in batch)
            return model(x).squeeze(-1), y

    class OwnBinary(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return torch.zeros(64), float(i % 2)

    binary = BinaryTask(name="binary-mlp", description="", load_data=TASK.load_data,
                        build_model=lambda activation="tanh": torch.nn.Linear(64, 1))
    try:
        register_task(binary)
        cfg = load_site_config(site_toml(tmp_path, task="binary-mlp"))
        x = torch.rand(30, 64)
        assert len(build_site(cfg, TensorDataset(x, (x[:, 0] > 0.5).float())).dataset) == 30
        assert len(build_site(cfg, OwnBinary()).dataset) == 30
        # the default loss still wants class indices
        with pytest.raises(JoinError, match=r"labels must be class indices \(int64\)"):
            build_site(load_site_config(site_toml(tmp_path)), TensorDataset(x, x[:, 0]))
    finally:
        TASKS.pop("binary-mlp", None)
