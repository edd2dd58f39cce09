/// \file train.hpp
/// \brief The toy experiment's model and training (protocol steps 3-6, README.md): a 784-256-10 MLP,
/// cross-entropy over all 10 logits, torch's Adam, pretraining on the odd classes, and fine-tuning
/// on the even classes with LoRA, PiSSA (exact or randomized) or all weights.
///
/// The adapted layers use pissa's LoRA forward/backward (through the rank-r bottleneck) and
/// pissa::init / pissa::lora_init; everything else is plain Eigen.
#pragma once

#include "data.hpp"

#include <pissa/init.hpp>
#include <pissa/lora.hpp>
#include <pissa/lora_backward.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fmnist {

/// The four fine-tuning methods of the protocol, named as in loss_curves.csv.
enum class Method { lora, pissa, pissa_niter_4, full };
inline const char* method_name(Method m) {
    switch (m) {
        case Method::lora:
            return "lora";
        case Method::pissa:
            return "pissa";
        case Method::pissa_niter_4:
            return "pissa_niter_4";
        default:
            return "full";
    }
}
inline Method parse_method(const std::string& name) {
    for (Method m : {Method::lora, Method::pissa, Method::pissa_niter_4, Method::full})
        if (name == method_name(m)) return m;
    throw std::invalid_argument("unknown method '" + name + "' (lora, pissa, pissa_niter_4, full)");
}

/// torch.optim.Adam's state for one tensor (defaults: beta1 0.9, beta2 0.999, eps 1e-8), in float
/// as torch computes it for float32 parameters.
struct AdamMoments {
    MatrixF m, v;

    /// One update at step t (1-based): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    /// p -= (lr / (1-b1^t)) m / (sqrt(v) / sqrt(1-b2^t) + eps).
    template <class DP, class DG>
    void step(Eigen::MatrixBase<DP>& p, const Eigen::MatrixBase<DG>& g, int t, double lr) {
        constexpr double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
        if (m.size() == 0) {
            m = MatrixF::Zero(g.rows(), g.cols());
            v = MatrixF::Zero(g.rows(), g.cols());
        }
        m.array() = m.array() * static_cast<float>(beta1) + g.array() * static_cast<float>(1 - beta1);
        v.array() = v.array() * static_cast<float>(beta2) + static_cast<float>(1 - beta2) * g.array() * g.array();
        const float step_size = static_cast<float>(lr / (1 - std::pow(beta1, t)));
        const float bc2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, t)));
        p.derived().array() -= step_size * (m.array() / ((v.array().sqrt() / bc2_sqrt) + static_cast<float>(eps)));
    }
};

/// A linear layer `y = x W^T + b`, optionally with a LoRA adapter `+ s (x A^T) B^T`.
/// With an adapter, W and b are frozen and only A, B train; without one, W and b train.
struct Layer {
    MatrixF W;  ///< [out, in] (the residual for PiSSA)
    VectorF b;  ///< [out]
    bool adapted = false;
    MatrixF A, B;  ///< [r, in], [out, r]
    double s = 1;
    AdamMoments adam_W, adam_b, adam_A, adam_B;

    MatrixF forward(const MatrixF& x) const {
        if (adapted) return pissa::lora_forward(x, W, A, B, s, b);
        MatrixF y = x * W.transpose();
        y.rowwise() += b.transpose();
        return y;
    }

    /// Adam step on the trainable tensors given dL/dy; returns dL/dx when `want_dx`.
    MatrixF backward_and_step(const MatrixF& x, const MatrixF& dy, bool want_dx, int t, double lr) {
        MatrixF dx;
        if (adapted) {
            pissa::LoraBackwardOptions options;
            options.input_gradient = want_dx;
            auto g = pissa::lora_backward(x, W, A, B, s, dy, options);
            adam_A.step(A, g.dA, t, lr);
            adam_B.step(B, g.dB, t, lr);
            dx = std::move(g.dx);
        } else {
            if (want_dx) dx.noalias() = dy * W;  // before W is updated
            const MatrixF dW = dy.transpose() * x;
            const VectorF db = dy.colwise().sum().transpose();
            adam_W.step(W, dW, t, lr);
            adam_b.step(b, db, t, lr);
        }
        return dx;
    }
};

/// The MLP: fc1 = Linear(784, 256) -> ReLU -> fc2 = Linear(256, 10).
struct Mlp {
    Layer fc1, fc2;

    MatrixF logits(const MatrixF& x) const { return fc2.forward(fc1.forward(x).cwiseMax(0.0f)); }
};

/// Mean cross-entropy of softmax(logits) against the labels (float64 for the value); when `grad`
/// is given it receives dL/dlogits = (softmax - onehot) / batch in float.
inline double cross_entropy(const MatrixF& logits, const std::vector<int>& labels, MatrixF* grad) {
    const Index n = logits.rows();
    double total = 0;
    if (grad) grad->resize(n, logits.cols());
    for (Index i = 0; i < n; ++i) {
        const float max = logits.row(i).maxCoeff();
        double sum = 0;
        for (Index j = 0; j < logits.cols(); ++j) sum += std::exp(static_cast<double>(logits(i, j) - max));
        const double log_sum = std::log(sum);
        const int label = labels[static_cast<std::size_t>(i)];
        total += log_sum - static_cast<double>(logits(i, label) - max);
        if (grad) {
            for (Index j = 0; j < logits.cols(); ++j)
                (*grad)(i, j) = static_cast<float>(std::exp(static_cast<double>(logits(i, j) - max) - log_sum) / n);
            (*grad)(i, label) -= 1.0f / static_cast<float>(n);
        }
    }
    return total / static_cast<double>(n);
}

/// One training step on a batch: forward, the batch loss (before the update), backward, Adam.
inline double train_step(Mlp& net, const MatrixF& x, const std::vector<int>& labels, int t, double lr) {
    const MatrixF z1 = net.fc1.forward(x);
    const MatrixF h = z1.cwiseMax(0.0f);
    const MatrixF logits = net.fc2.forward(h);
    MatrixF dlogits;
    const double loss = cross_entropy(logits, labels, &dlogits);
    MatrixF dh = net.fc2.backward_and_step(h, dlogits, true, t, lr);
    dh.array() *= (z1.array() > 0.0f).cast<float>();
    net.fc1.backward_and_step(x, dh, false, t, lr);
    return loss;
}

/// Accuracy (argmax, first index on ties) and mean cross-entropy over `positions` of a split.
struct Evaluation {
    double accuracy = 0, loss = 0;
};
inline Evaluation evaluate(const Mlp& net, const Split& split, const std::vector<Index>& positions) {
    Evaluation out;
    if (positions.empty()) return out;
    constexpr std::size_t chunk = 1000;
    MatrixF x;
    std::vector<int> labels;
    double loss_sum = 0;
    std::size_t correct = 0;
    for (std::size_t first = 0; first < positions.size(); first += chunk) {
        const std::size_t count = std::min(chunk, positions.size() - first);
        gather(split, positions, first, count, x, labels);
        const MatrixF logits = net.logits(x);
        loss_sum += cross_entropy(logits, labels, nullptr) * static_cast<double>(count);
        for (Index i = 0; i < logits.rows(); ++i) {
            Index arg = 0;
            for (Index j = 1; j < logits.cols(); ++j)
                if (logits(i, j) > logits(i, arg)) arg = j;
            correct += static_cast<std::size_t>(arg == labels[static_cast<std::size_t>(i)]);
        }
    }
    out.accuracy = static_cast<double>(correct) / static_cast<double>(positions.size());
    out.loss = loss_sum / static_cast<double>(positions.size());
    return out;
}

/// torch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W then b, drawn from
/// splitmix64 (the protocol's generator; torch's own cannot be reproduced), fc1 then fc2.
inline Mlp random_mlp(std::uint64_t seed) {
    pissa::detail::SplitMix64 rng(seed);
    auto uniform = [&](Index rows, Index cols, double fan_in) {
        const double bound = 1.0 / std::sqrt(fan_in);
        MatrixF m(rows, cols);
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<float>(bound * (2 * rng.uniform() - 1));
        return m;
    };
    Mlp net;
    net.fc1.W = uniform(256, 784, 784);
    net.fc1.b = uniform(256, 1, 784);
    net.fc2.W = uniform(10, 256, 256);
    net.fc2.b = uniform(10, 1, 256);
    return net;
}

/// Pretraining (protocol step 5, README.md): `epochs` epochs over `odd_train`, each a fresh shuffle
/// of the ascending list by one splitmix64(0) generator; batches of 128 (the last one partial);
/// Adam lr 1e-3 on all tensors. Returns the number of steps.
inline int pretrain(Mlp& net, const Split& train, const std::vector<Index>& odd_train, int epochs) {
    pissa::detail::SplitMix64 rng(0);
    constexpr std::size_t batch = 128;
    MatrixF x;
    std::vector<int> labels;
    int t = 0;
    for (int epoch = 0; epoch < epochs; ++epoch) {
        std::vector<Index> order = odd_train;
        shuffle(order, rng);
        for (std::size_t first = 0; first < order.size(); first += batch) {
            gather(train, order, first, std::min(batch, order.size() - first), x, labels);
            train_step(net, x, labels, ++t, 1e-3);
        }
    }
    return t;
}

/// One fine-tuning run of the grid.
struct RunConfig {
    Method method = Method::pissa;
    double lr = 1e-3;
    std::uint64_t seed = 0;
    int steps = 300;
    Index batch = 64;
    Index rank = 8;
    double lora_alpha = 8;
};
struct RunResult {
    std::vector<double> loss;       ///< the batch loss of steps 1..steps, before each update
    double even_test_accuracy = 0;  ///< after the last step
    /// Largest |logit| difference on the even test images between the trained adapters and the same
    /// model with them merged into the base weights (pissa::lora_merge), as deployed; 0 for full.
    double merge_max_logit_change = 0;
};

/// Puts the method's adapter on a pretrained layer (`layer_index` 0 for fc1, 1 for fc2: the
/// random stream of that layer is stream_seed(seed, layer_index)).
inline void attach_adapter(Layer& layer, const RunConfig& config, int layer_index) {
    if (config.method == Method::full) return;
    const std::uint64_t layer_seed = pissa::detail::stream_seed(config.seed, static_cast<std::uint64_t>(layer_index));
    layer.adapted = true;
    if (config.method == Method::lora) {
        auto adapter =
            pissa::lora_init<float>(layer.W.rows(), layer.W.cols(), config.rank, config.lora_alpha, layer_seed);
        layer.A = std::move(adapter.A);
        layer.B = std::move(adapter.B);
        layer.s = adapter.scaling;
        return;
    }
    pissa::PissaConfig pissa_config;
    pissa_config.rank = config.rank;
    pissa_config.lora_alpha = config.lora_alpha;
    if (config.method == Method::pissa_niter_4) {
        pissa_config.method = pissa::SvdMethod::randomized;
        pissa_config.randomized.niter = 4;
        pissa_config.randomized.oversampling = 0;
        pissa_config.randomized.seed = layer_seed;
    }
    auto split = pissa::init(layer.W, pissa_config);
    layer.W = std::move(split.residual);
    layer.A = std::move(split.A);
    layer.B = std::move(split.B);
    layer.s = split.scaling;
}

/// The fine-tuning data order: shuffle([0, 1, ..., n-1], splitmix64(seed)), positions into even_train.
inline std::vector<Index> finetune_order(std::size_t n, std::uint64_t seed) {
    std::vector<Index> order(n);
    for (std::size_t i = 0; i < n; ++i) order[i] = static_cast<Index>(i);
    pissa::detail::SplitMix64 rng(seed);
    shuffle(order, rng);
    return order;
}

/// Fine-tuning (protocol step 6, README.md): data order shuffle([0, n), splitmix64(seed)) over
/// `even_train` (n = its size), step k uses order[batch (k-1) .. batch k - 1].
inline RunResult finetune(const Mlp& pretrained, const Split& train, const std::vector<Index>& even_train,
                          const Split& test, const std::vector<Index>& even_test, const RunConfig& config) {
    if (static_cast<std::size_t>(config.steps) * static_cast<std::size_t>(config.batch) > even_train.size())
        throw std::invalid_argument("finetune: " + std::to_string(config.steps) + " steps of " +
                                    std::to_string(config.batch) + " need more than the " +
                                    std::to_string(even_train.size()) + " even training images");
    Mlp net = pretrained;
    attach_adapter(net.fc1, config, 0);
    attach_adapter(net.fc2, config, 1);
    std::vector<Index> order = finetune_order(even_train.size(), config.seed);
    for (auto& o : order) o = even_train[static_cast<std::size_t>(o)];

    RunResult result;
    MatrixF x;
    std::vector<int> labels;
    const auto batch = static_cast<std::size_t>(config.batch);
    for (int k = 1; k <= config.steps; ++k) {
        gather(train, order, batch * static_cast<std::size_t>(k - 1), batch, x, labels);
        result.loss.push_back(train_step(net, x, labels, k, config.lr));
    }
    result.even_test_accuracy = evaluate(net, test, even_test).accuracy;
    if (net.fc1.adapted && !even_test.empty()) {
        Mlp merged = net;
        for (Layer* layer : {&merged.fc1, &merged.fc2}) {
            pissa::lora_merge(layer->W, layer->A, layer->B, layer->s);  // W_base + s B A
            layer->adapted = false;
        }
        gather(test, even_test, 0, std::min<std::size_t>(even_test.size(), 1000), x, labels);
        result.merge_max_logit_change = (net.logits(x) - merged.logits(x)).cwiseAbs().maxCoeff();
    }
    return result;
}

}  // namespace fmnist
