"""Tests of dspt_jax.methods.joapr_core: the mixture against scikit-learn's GaussianMixture (the repo's own
partition model), the thresholds against closed forms, and the training-step pieces by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from dspt_jax.methods import joapr_core as jc

GMM_KW = dict(max_iter=10, tol=1e-2, reg_covar=5e-4)  # joapr.py:648


def two_clusters(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.1, 0.05, 300), rng.normal(0.7, 0.1, 100)])


def overlapping(seed=1):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.gamma(2.0, 0.08, 250), rng.normal(0.45, 0.2, 150)])
    return jc.normalize_losses(x)


def sk_fit(x, **kw):
    return GaussianMixture(n_components=2, **{**GMM_KW, **kw}).fit(x[:, None])


def sk_sorted(sk):
    o = np.argsort(sk.means_.ravel())
    return sk.weights_[o], sk.means_.ravel()[o], sk.covariances_.ravel()[o]


def npdf(x, m, sd):
    return np.exp(-0.5 * ((x - m) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


# ----------------------------------------------------------------------------------------- mixture


@pytest.mark.parametrize("random_state", [0, 1, 2])
def test_fit_gmm_matches_sklearn_on_two_clusters(random_state):
    x = two_clusters()
    ours = jc.fit_gmm_1d(x, **GMM_KW)
    sk = sk_fit(x, random_state=random_state)
    for a, b in zip((ours.weights, ours.means, ours.variances), sk_sorted(sk)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert ours.n_iter == sk.n_iter_ and ours.converged == sk.converged_
    assert ours.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-12)
    post = jc.gmm_posteriors(x, ours)
    sk_post = sk.predict_proba(x[:, None])[:, np.argsort(sk.means_.ravel())]
    np.testing.assert_allclose(post, sk_post, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jc.clean_probability(x, ours), sk_post[:, 0], rtol=1e-9, atol=1e-12)
    # The two clusters are found: means and weights near the generating ones.
    np.testing.assert_allclose(ours.means, [0.1, 0.7], atol=0.02)
    np.testing.assert_allclose(ours.weights, [0.75, 0.25], atol=0.01)


def test_two_means_labels_match_sklearn_kmeans_and_are_optimal():
    x = two_clusters()
    labels = jc.two_means_labels(x)
    km = KMeans(n_clusters=2, n_init=1, random_state=0).fit(x[:, None]).labels_
    assert (km == labels).all() or (km == 1 - labels).all()
    assert x[labels == 0].max() < x[labels == 1].min()
    # Brute force on a small skewed sample: no split of the sorted data has a smaller within-cluster SSE.
    y = np.random.default_rng(3).exponential(1.0, 40)
    lab = jc.two_means_labels(y)
    sse = lambda a: ((a - a.mean()) ** 2).sum()  # noqa: E731
    best = min(sse(np.sort(y)[:s]) + sse(np.sort(y)[s:]) for s in range(1, y.size))
    assert sse(y[lab == 0]) + sse(y[lab == 1]) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError):
        jc.two_means_labels(np.full(5, 0.3))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("tol,max_iter", [(1e-2, 10), (1e-12, 10), (1e-9, 200)])
def test_fit_gmm_matches_sklearn_iteration_by_iteration_from_its_kmeans_init(tol, max_iter):
    """Same k-means labels as sklearn (its KMeans with the same RandomState): same EM to rounding, in
    sklearn's component order, also when EM stops at max_iter before converging."""
    x = overlapping()
    sk = sk_fit(x, tol=tol, max_iter=max_iter, random_state=0)
    labels = KMeans(n_clusters=2, n_init=1, random_state=np.random.RandomState(0)).fit(x[:, None]).labels_
    ours = jc.fit_gmm_1d(x, max_iter=max_iter, tol=tol, reg_covar=5e-4, init_labels=labels)
    np.testing.assert_allclose(ours.weights, sk.weights_, rtol=1e-8)
    np.testing.assert_allclose(ours.means, sk.means_.ravel(), rtol=1e-8)
    np.testing.assert_allclose(ours.variances, sk.covariances_.ravel(), rtol=1e-8)
    assert (ours.n_iter, ours.converged) == (sk.n_iter_, sk.converged_)
    np.testing.assert_allclose(jc.gmm_posteriors(x, ours), sk.predict_proba(x[:, None]), rtol=1e-7, atol=1e-10)
    # The default (deterministic 2-means) init gives the same mixture here.
    default = jc.fit_gmm_1d(x, max_iter=max_iter, tol=tol, reg_covar=5e-4)
    np.testing.assert_allclose(np.sort(default.means), np.sort(ours.means), rtol=1e-8)


def test_fit_gmm_means_init_as_sklearn():
    x = overlapping()
    means_init = np.array([[0.05], [0.9]])
    sk = sk_fit(x, means_init=means_init, random_state=0)
    labels = KMeans(n_clusters=2, n_init=1, random_state=np.random.RandomState(0)).fit(x[:, None]).labels_
    ours = jc.fit_gmm_1d(x, **GMM_KW, init_labels=labels, means_init=means_init.ravel())
    np.testing.assert_allclose(ours.means, sk.means_.ravel(), rtol=1e-8)
    np.testing.assert_allclose(ours.variances, sk.covariances_.ravel(), rtol=1e-8)
    assert ours.n_iter == sk.n_iter_


# -------------------------------------------------------------------------------------- thresholds


def test_gaussian_intersection_on_two_clusters():
    x = two_clusters()
    g = jc.fit_gmm_1d(x, **GMM_KW)
    t = jc.gaussian_intersection(g)
    (w_c, w_n), (m_c, m_n), (v_c, v_n) = g.weights, g.means, g.variances
    assert m_c < t < m_n
    # The weighted densities are equal there, so the clean posterior is 1/2.
    f_c, f_n = w_c * npdf(t, m_c, math.sqrt(v_c)), w_n * npdf(t, m_n, math.sqrt(v_n))
    assert f_c == pytest.approx(f_n, rel=1e-9)
    assert jc.clean_probability(np.array([t]), g)[0] == pytest.approx(0.5, abs=1e-9)
    # Closed form by hand: log(w_c f_c) = log(w_n f_n) is the quadratic
    # (1/(2v_n) - 1/(2v_c)) t^2 + (m_c/v_c - m_n/v_n) t + m_n^2/(2v_n) - m_c^2/(2v_c) + log(w_c/w_n) - log(v_c/v_n)/2.
    coeffs = [1 / (2 * v_n) - 1 / (2 * v_c), m_c / v_c - m_n / v_n,
              m_n ** 2 / (2 * v_n) - m_c ** 2 / (2 * v_c) + math.log(w_c / w_n) - 0.5 * math.log(v_c / v_n)]
    roots = [r.real for r in np.roots(coeffs) if abs(r.imag) < 1e-12 and m_c <= r.real <= m_n]
    assert len(roots) == 1 and t == pytest.approx(roots[0], rel=1e-9)
    # Equal weights and variances: the midpoint.
    sym = jc.GMM1D(np.array([0.5, 0.5]), np.array([0.2, 0.6]), np.array([0.01, 0.01]))
    assert jc.gaussian_intersection(sym) == pytest.approx(0.4, abs=1e-12)
    # One weighted component above the other all the way between the means: no crossing there.
    lopsided = jc.GMM1D(np.array([0.999, 0.001]), np.array([0.2, 0.3]), np.array([0.05, 0.01]))
    assert math.isnan(jc.gaussian_intersection(lopsided))


def repo_threshold(means, covariances):
    """joapr.py:651-666 transcribed (numpy instead of torch), the reference of the repo rule."""
    mean, std = np.asarray(means).reshape(-1), np.asarray(covariances).reshape(-1)
    idx_clean, idx_noise = mean.argmin(), mean.argmax()
    mean_clean, mean_noise, std_clean, std_noise = mean[idx_clean], mean[idx_noise], std[idx_clean], std[idx_noise]
    A = std_noise ** 2 - std_clean ** 2
    B = 2 * ((mean_noise * (std_clean ** 2)) - (mean_clean * (std_noise ** 2)))
    C = ((mean_clean * std_noise) ** 2) - ((mean_noise * std_clean) ** 2) + 2 * ((std_noise * std_clean) ** 2) * np.log(
        (2 * std_clean) / std_noise + 1e-8)
    E = B ** 2 - 4 * A * C
    with np.errstate(invalid="ignore"):
        return (-B + np.sqrt(E)) / (2 * A + 1e-10)


def test_joapr_intersection_threshold_is_the_repo_formula():
    x = two_clusters()
    g = jc.fit_gmm_1d(x, **GMM_KW)
    sk = sk_fit(x, random_state=0)
    t = jc.joapr_intersection_threshold(g)
    assert t == pytest.approx(repo_threshold(sk.means_, sk.covariances_), rel=1e-9)
    # What it is: the crossing of N(m_c, sd=v_c) and 2 N(m_n, sd=v_n), variances used as standard deviations.
    (m_c, m_n), (v_c, v_n) = g.means, g.variances
    assert npdf(t, m_c, v_c) == pytest.approx(2 * npdf(t, m_n, v_n), rel=1e-6)
    assert m_c < t < m_n
    # A negative discriminant gives nan (the repo's sqrt of a negative number), and then pred_1 selects nothing.
    # Here 2 N(0.45, sd=0.31) lies above N(0.4, sd=0.3) everywhere.
    odd = jc.GMM1D(np.array([0.5, 0.5]), np.array([0.4, 0.45]), np.array([0.3, 0.31]))
    assert math.isnan(jc.joapr_intersection_threshold(odd)) and math.isnan(repo_threshold(odd.means, odd.variances))


def test_noise_rate_threshold_by_hand():
    prob = np.array([0.9, 0.6, 0.4, 0.1, 0.55])
    # 3 of 5 above the previous threshold 0.5: estimated noise rate 2/5 is the new threshold.
    assert jc.noise_rate_threshold(prob, 0.5) == pytest.approx(0.4)
    assert jc.noise_rate_threshold(prob, 0.58) == pytest.approx(0.6)  # 2 of 5 above
    assert jc.noise_rate_threshold(prob, 0.5, n_total=10) == pytest.approx(0.7)  # the repo's K * NUM_SHOTS
    assert jc.noise_rate_threshold(prob, 0.9) == pytest.approx(1.0)  # strict '>'


def test_partition_on_two_clusters():
    x = two_clusters()
    part = jc.partition(x, 0.5)
    # By hand from sklearn (the repo's pipeline): pred_1 OR pred_2.
    sk = sk_fit(x, random_state=0)
    prob = sk.predict_proba(x[:, None])[:, sk.means_.ravel().argmin()]
    thr = (400 - np.count_nonzero(prob > 0.5)) / 400
    expected = (x < repo_threshold(sk.means_, sk.covariances_)) | (prob > thr)
    np.testing.assert_array_equal(part.clean, expected)
    assert part.prob_threshold == pytest.approx(thr)
    np.testing.assert_allclose(part.clean_prob, prob, rtol=1e-9, atol=1e-12)
    # What it should select: the 300 low-loss examples, and next to none of the 100 high-loss ones.
    assert part.clean[:300].all() and part.clean[300:].sum() <= 2
    assert thr == pytest.approx(1 - (300 + part.clean[300:].sum()) / 400, abs=0.01)
    # The prob threshold is state: the next epoch starts from it.
    part2 = jc.partition(x, part.prob_threshold)
    assert part2.prob_threshold == pytest.approx((400 - np.count_nonzero(prob > thr)) / 400)
    # The textbook crossing rule, on request.
    w = jc.partition(x, 0.5, loss_rule="weighted")
    assert w.loss_threshold == pytest.approx(jc.gaussian_intersection(part.gmm))


def test_partition_degenerate_losses_are_all_clean():
    part = jc.partition(np.zeros(6), 0.5)
    assert part.clean.all() and (part.clean_prob == 1).all() and part.gmm is None
    assert part.prob_threshold == 0.0


# ------------------------------------------------------------------------------ normalization, history


def test_normalize_losses_by_hand():
    np.testing.assert_allclose(jc.normalize_losses([2.0, 4.0, 3.0, 6.0]), [0.0, 0.5, 0.25, 1.0])
    np.testing.assert_array_equal(jc.normalize_losses([1.5, 1.5, 1.5]), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        jc.normalize_losses([0.0, np.nan])


def test_loss_history_averages_the_last_window_epochs():
    h = jc.LossHistory.create(num_examples=2, window=3)
    epochs = [[0.0, 1.0], [0.3, 0.6], [0.6, 0.2], [0.9, 0.5], [0.3, 0.1]]
    expected = [[0.0, 1.0], [0.15, 0.8], [0.3, 0.6], [0.6, 0.433333333333], [0.6, 0.266666666667]]
    for row, want in zip(epochs, expected):
        h = h.push(row)
        np.testing.assert_allclose(h.mean(), want, rtol=1e-10)
    assert h.count == 5 and h.window == 3
    restored = jc.LossHistory.from_state_dict(h.state_dict())
    np.testing.assert_array_equal(restored.buffer, h.buffer)
    assert restored.count == 5
    np.testing.assert_allclose(restored.push([0.0, 0.0]).mean(), [(0.9 + 0.3) / 3, (0.5 + 0.1) / 3])
    np.testing.assert_allclose(jc.average_last_epochs(h.buffer, h.count), h.mean())
    with pytest.raises(ValueError):
        jc.LossHistory.create(2).mean()
    with pytest.raises(ValueError):
        h.push([0.1, 0.2, 0.3])


# --------------------------------------------------------------------------------------- train step


def test_sharpen_by_hand():
    np.testing.assert_allclose(jc.sharpen(jnp.array([[0.2, 0.8], [0.5, 0.5]]), 2.0),
                               [[1 / 17, 16 / 17], [0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(jc.sharpen(jnp.array([0.1, 0.3, 0.6]), 1.0), [0.1, 0.3, 0.6], rtol=1e-6)
    np.testing.assert_allclose(jc.pseudo_labels(jnp.array([[0.2, 0.8]])), [[1 / 17, 16 / 17]], rtol=1e-6)


def test_refine_labels_by_hand():
    probs = jnp.array([[0.6, 0.4], [0.2, 0.8]])
    w = jnp.array([0.5, 1.0])
    # Row 0: 0.5 [0, 1] + 0.5 [0.6, 0.4] = [0.3, 0.7] -> [0.09, 0.49] / 0.58. Row 1: w = 1 keeps the label.
    want = [[0.09 / 0.58, 0.49 / 0.58], [1.0, 0.0]]
    np.testing.assert_allclose(jc.refine_labels(jnp.array([1, 0]), probs, w, 2.0), want, rtol=1e-6)
    np.testing.assert_allclose(jc.refine_labels(jnp.array([[0.0, 1.0], [1.0, 0.0]]), probs, w, 2.0), want,
                               rtol=1e-6)
    np.testing.assert_allclose(jc.refinement_weights([0.5, 0.9]), [0.5, 0.9])
    np.testing.assert_allclose(jc.refinement_weights([0.5, 0.9], [0.2, 1.0]), [0.1, 0.9])


def test_mixup_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mx, my = jc.mixup(x, y, 0.75, jnp.array([2, 0, 1]))
    np.testing.assert_allclose(mx, [[2.0, 3.0], [2.5, 3.5], [4.5, 5.5]], rtol=1e-6)
    np.testing.assert_allclose(my, [[0.875, 0.125], [0.25, 0.75], [0.375, 0.625]], rtol=1e-6)
    mx, my, lam, perm = jc.mixup_with_key(jax.random.PRNGKey(0), x, y, beta=0.5)
    assert 0.5 <= float(lam) <= 1.0 and sorted(np.asarray(perm).tolist()) == [0, 1, 2]
    np.testing.assert_allclose(mx, lam * x + (1 - lam) * x[perm], rtol=1e-6)


def test_sample_mixup_lambda():
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    tiny = np.asarray(jax.vmap(lambda k: jc.sample_mixup_lambda(k, 0.001))(keys))
    assert np.isfinite(tiny).all() and (tiny >= 0.5).all() and (tiny <= 1.0).all()
    assert np.mean(tiny > 0.999) > 0.95  # Beta(0.001, 0.001): lam is 1 but for a rare draw
    flat = np.asarray(jax.vmap(lambda k: jc.sample_mixup_lambda(k, 1.0))(keys))
    assert flat.mean() == pytest.approx(0.75, abs=0.015)  # max(U, 1 - U), U uniform: mean 3/4


def test_uniform_prior_penalty_by_hand():
    assert float(jc.uniform_prior_penalty(jnp.full(4, 0.25))) == pytest.approx(0.0, abs=1e-7)
    want = (math.log((1 / 3) / 0.5) + 2 * math.log((1 / 3) / 0.25)) / 3
    assert float(jc.uniform_prior_penalty(jnp.array([0.5, 0.25, 0.25]))) == pytest.approx(want, rel=1e-6)
    assert want > 0


def test_mixmatch_loss_by_hand():
    logits = jnp.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]])  # p = [.25,.75], [.75,.25]
    targets = jnp.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    mask = jnp.array([1.0, 1.0, 0.0])
    lx = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(0.75)) / 2
    # Mean prediction of the two kept rows is uniform: no penalty.
    assert float(jc.mixmatch_loss(logits, targets, 0.5, mask)) == pytest.approx(lx, rel=1e-6)
    assert float(jax.jit(jc.mixmatch_loss)(logits, targets, 0.5, mask)) == pytest.approx(lx, rel=1e-6)
    pbar = np.array([0.25 + 0.75 + 1 / (1 + math.exp(-10)), 0.75 + 0.25 + 1 / (1 + math.exp(10))]) / 3
    ce3 = -math.log(1 / (1 + math.exp(10)))
    want = (2 * lx + ce3) / 3 + 0.5 * 0.5 * (math.log(0.5 / pbar[0]) + math.log(0.5 / pbar[1]))
    assert float(jc.mixmatch_loss(logits, targets, 0.5)) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(jc.soft_cross_entropy(logits[:2], targets[:2]),
                               [-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), -math.log(0.75)], rtol=1e-6)


def test_warmup_and_partition_losses_by_hand():
    logits = jnp.array([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    negent = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    np.testing.assert_allclose(jc.negative_entropy(logits), [negent], rtol=1e-6)
    np.testing.assert_allclose(jc.warmup_loss(logits, jnp.array([0]), 0.5), [math.log(4) + 0.5 * negent], rtol=1e-6)
    np.testing.assert_allclose(jc.partition_loss(logits, jnp.array([0])), [math.log(4) - negent], rtol=1e-6)
    np.testing.assert_allclose(jc.partition_loss_from_probs([[0.25, 0.75]], [0]), [math.log(4) - negent],
                               rtol=1e-12)
    # Saturated logits stay finite (the repo's probs.log() * probs would be 0 * -inf).
    assert np.isfinite(np.asarray(jc.negative_entropy(jnp.array([[0.0, 200.0]])))).all()


def test_defaults_and_readme_settings():
    assert jc.RN50_DEFAULTS["warmup_epochs"] == 1 and jc.RN50_DEFAULTS["alpha2"] == 0.5
    assert jc.RN50_DEFAULTS["beta"] == 0.001 and jc.RN50_DEFAULTS["temperature"] == 2.0
    assert jc.readme_setting("caltech101", "symflip", 4) == {"warmup_epochs": 1, "alpha1": 0.5, "alpha2": 0.5}
    assert jc.readme_setting("oxford_flowers", "pairflip", 8)["warmup_epochs"] == 1
    assert jc.readme_setting("oxford_flowers", "symflip", 8)["warmup_epochs"] == 20
    assert jc.readme_setting("fgvc_aircraft", "symflip", 12) == {"warmup_epochs": 150, "alpha1": 0.5, "alpha2": 1.0}
    assert jc.readme_setting("eurosat", "pairflip", 8) == {"warmup_epochs": 10, "alpha1": 0.2, "alpha2": 1.0}
    assert jc.readme_setting("dtd", "pairflip", 12)["alpha1"] == 0.1
    assert jc.readme_setting("dtd", "symflip", 12)["alpha1"] == 0.2
    with pytest.raises(ValueError):
        jc.readme_setting("food101", "symflip", 4)
    with pytest.raises(ValueError):
        jc.readme_setting("caltech101", "symflip", 3)
