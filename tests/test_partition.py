import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortia.simulations.partition import dirichlet_partition, iid_partition, partition


def assert_exact_cover(parts, n):
    merged = np.concatenate(parts)
    assert len(merged) == n
    assert np.array_equal(np.sort(merged), np.arange(n))


@given(n=st.integers(10, 2000), clients=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_iid_puts_every_sample_in_exactly_one_client(n, clients, seed):
    parts = iid_partition(n, clients, seed)
    assert len(parts) == clients
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@given(clients=st.integers(2, 8), alpha=st.floats(0.05, 10), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_dirichlet_is_an_exact_cover_with_minimum_sizes(clients, alpha, seed):
    labels = np.random.default_rng(1).integers(0, 10, size=3000)
    parts = dirichlet_partition(labels, clients, alpha, seed, min_samples=20)
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20


def test_partitions_are_deterministic_for_a_seed_and_differ_across_seeds():
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    for kind in ("iid", "dirichlet"):
        a = partition(labels, 5, kind, 0.5, seed=3)
        b = partition(labels, 5, kind, 0.5, seed=3)
        c = partition(labels, 5, kind, 0.5, seed=4)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    labels = np.repeat(np.arange(10), 600)

    def mean_classes_covering_90pct(alpha):
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        counts = []
        for p in parts:
            freq = np.sort(np.bincount(labels[p], minlength=10))[::-1]
            counts.append(int(np.searchsorted(np.cumsum(freq) / freq.sum(), 0.9) + 1))
        return np.mean(counts)

    assert mean_classes_covering_90pct(0.1) < 4
    assert mean_classes_covering_90pct(100.0) >= 8


def test_impossible_partitions_fail_with_reasons():
    with pytest.raises(ValueError, match="clients = 5: cannot split 3 samples among 5 "
                                         "clients, one at least each; accepted: clients ≤ 3"):
        iid_partition(3, 5, 0)
    with pytest.raises(ValueError, match="partition.min_samples = 10: .*accepted: "
                                         "partition.min_samples ≤ 5 for 10 clients"):
        dirichlet_partition(np.zeros(50, dtype=int), 10, 0.5, 0, min_samples=10)
    with pytest.raises(ValueError, match="accepted: iid, dirichlet"):
        partition(np.zeros(50, dtype=int), 2, "shards", 0.5, 0)


def test_a_dirichlet_draw_that_cannot_be_had_names_the_keys_and_what_is_accepted():
    # Said 'raise alpha or lower partition.min_samples' even at min_samples = 1, the
    # lowest there is, and never that fewer clients would do.
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError) as err:
        dirichlet_partition(labels, 30, 0.01, 0, min_samples=1)
    message = str(err.value)
    assert message.startswith("partition.alpha = 0.01: no Dirichlet draw in 1000 gave all 30 "
                              "clients at least partition.min_samples = 1 samples (the best "
                              "gave ")
    assert message.endswith("accepted: a higher partition.alpha, or fewer clients")
    with pytest.raises(ValueError, match="accepted: a higher partition.alpha, a lower "
                                         "partition.min_samples, or fewer clients"):
        dirichlet_partition(labels, 30, 0.01, 0, min_samples=10)


def test_train_and_test_examples_cut_the_data_of_the_tasks_trained_from_scratch():
    """digits-mlp (and fashion-mnist-cnn) ignored train_examples / test_examples: every
    client kept its whole partition and the server tested on the whole test set."""
    import torch

    from consortia.config import load_config
    from consortia.simulations.sites import partitions_for
    from consortia.tasks import get_task

    cfg = load_config(None, ["train_examples=100", "test_examples=50"])
    assert cfg.task == "digits-mlp"
    assert sum(len(p) for p in partitions_for(cfg)) == 100
    data = get_task(cfg.task, cfg.task_options()).load_data(cfg.data_dir)
    assert (len(data.train), len(data.test)) == (100, 50)
    # A fixed subset, whatever the run's seed; the full sets when unset.
    other = get_task(cfg.task, load_config(None, ["train_examples=100", "seed=7"]).task_options())
    assert torch.equal(other.load_data(None).train.tensors[0], data.train.tensors[0])
    full = get_task("digits-mlp", load_config(None).task_options()).load_data(None)
    assert (len(full.train), len(full.test)) == (1438, 359)


def test_train_examples_is_refused_for_a_task_whose_data_names_its_clients():
    from consortia.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train_examples = 100 does not apply to task "
                                          "'shakespeare-smollm2-lora'"):
        load_config(None, ["task=shakespeare-smollm2-lora", "partition.kind=natural",
                           "train_examples=100"])


@pytest.mark.parametrize("assignment, named", [
    ("train_examples=5000", "train_examples = 5000, but the task's training set has 1,438 "
                            "examples; accepted: 1 … 1438"),
    ("test_examples=360", "test_examples = 360, but the task's test set has 359 examples; "
                          "accepted: 1 … 359"),
])
def test_more_train_or_test_examples_than_the_task_has_fail_at_start(assignment, named):
    """They were taken as all of the set, silently: a run recorded as train_examples = 5000
    trained on digits' 1,438."""
    from consortia.config import load_config
    from consortia.simulations.runner import start_checks

    with pytest.raises(ValueError, match=named):
        start_checks(load_config(None, [assignment]))
    start_checks(load_config(None, ["train_examples=1438", "test_examples=359",
                                    "privacy.enabled=false"]))


def test_fashion_mnist_records_are_the_same_pixels_for_sites_and_the_servers_test_set(tmp_path):
    """The task's records (partners.md, Task.records, a folder of PNGs) are pixels in [0, 1],
    but load_data standardized them, (x - 0.286) / 0.353: the server tested, and the
    simulation trained, on other inputs than a site that prepared its records as told. A
    CNN trained on 6,000 [0, 1] images scored 0.72 on [0, 1] test images and 0.58 on the
    server's standardized ones. The model standardizes now, so both are the same pixels."""
    import numpy as np
    import torch
    from PIL import Image

    from consortia.client.data import load_site_data
    from consortia.client.site_config import DataSection
    from consortia.tasks import get_task

    task = get_task("fashion-mnist-cnn")
    try:
        test = task.load_data(None).test
    except FileNotFoundError as err:  # Fashion-MNIST is a Debian package (make installs it)
        pytest.skip(str(err))
    images, labels = test.tensors[0][:4], test.tensors[1][:4]
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    # The same images as a site's folder of PNGs: the records the server tests on.
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / f"{int(label):02d}"
        folder.mkdir(exist_ok=True)
        pixels = np.rint(image[0].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    site = load_site_data(DataSection(kind="folder", path=tmp_path), task)
    from_site = torch.stack([site[i][0] for i in range(len(site))])
    order = sorted(range(4), key=lambda i: (int(labels[i]), i))
    assert torch.allclose(from_site, images[order], atol=1e-6)
    torch.manual_seed(0)
    model = task.build_model("tanh")
    with torch.no_grad():
        assert torch.allclose(model(from_site), model(images[order]), atol=1e-6)
        # ... standardized inside the model, as load_data did: the same outputs as before.
        plain = torch.nn.Sequential(*model)
        assert torch.equal(model(images), plain((images - 0.2860) / 0.3530))
