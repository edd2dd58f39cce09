/// \file report.hpp
/// \brief What the grid produces (protocol step 6, README.md, "Logging" onwards): window means, the
/// table of seed means [min-max], each method's best lr, the PiSSA - LoRA claim check,
/// loss_curves.csv, and an SVG plot of the curves at each method's best lr.
#pragma once

#include "train.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <ostream>
#include <string>
#include <vector>

namespace fmnist {

/// One finished run of the grid.
struct GridRun {
    RunConfig config;
    RunResult result;
};

/// Mean of the losses of steps max(1, k-9) .. k (1-based): the 10-step window that ends at step k.
inline double window_mean(const std::vector<double>& loss, int k) {
    const int first = std::max(1, k - 9);
    double sum = 0;
    for (int i = first; i <= k; ++i) sum += loss[static_cast<std::size_t>(i - 1)];
    return sum / (k - first + 1);
}

/// Ends of the plotted windows: 10, 20, ..., and `steps` itself when it is not a multiple of 10.
inline std::vector<int> window_ends(int steps) {
    std::vector<int> ends;
    for (int k = 10; k <= steps; k += 10) ends.push_back(k);
    if (steps % 10 != 0) ends.push_back(steps);
    return ends;
}

/// The reported steps: 10, 30, 100, 300 where the run is that long, plus the last step.
inline std::vector<int> report_steps(int steps) {
    std::vector<int> out;
    for (int k : {10, 30, 100, 300})
        if (k <= steps) out.push_back(k);
    if (out.empty() || out.back() != steps) out.push_back(steps);
    return out;
}

/// mean, min and max of a list of values.
struct Spread {
    double mean = 0, min = 0, max = 0;
};
inline Spread spread(const std::vector<double>& v) {
    Spread s{0, std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
    for (double x : v) {
        s.mean += x;
        s.min = std::min(s.min, x);
        s.max = std::max(s.max, x);
    }
    s.mean /= static_cast<double>(v.size());
    return s;
}

/// The grid's results organised by method and learning rate (runs in seed order).
class Grid {
public:
    Grid(std::vector<GridRun> runs, std::vector<Method> methods, std::vector<double> lrs, int steps)
        : m_runs(std::move(runs)), m_methods(std::move(methods)), m_lrs(std::move(lrs)), m_steps(steps) {}

    const std::vector<Method>& methods() const { return m_methods; }
    const std::vector<double>& lrs() const { return m_lrs; }
    int steps() const { return m_steps; }
    const std::vector<GridRun>& runs() const { return m_runs; }

    std::vector<const GridRun*> cell(Method m, double lr) const {
        std::vector<const GridRun*> out;
        for (const auto& r : m_runs)
            if (r.config.method == m && r.config.lr == lr) out.push_back(&r);
        std::sort(out.begin(), out.end(), [](auto a, auto b) { return a->config.seed < b->config.seed; });
        return out;
    }
    /// Window means ending at step k over the seeds of a cell.
    std::vector<double> windows(Method m, double lr, int k) const {
        std::vector<double> out;
        for (const auto* r : cell(m, lr)) out.push_back(window_mean(r->result.loss, k));
        return out;
    }
    /// The lr with the lowest seed-mean loss in the last window.
    double best_lr(Method m) const {
        double best = m_lrs.front(), best_loss = std::numeric_limits<double>::infinity();
        for (double lr : m_lrs) {
            const double loss = spread(windows(m, lr, m_steps)).mean;
            if (loss < best_loss) best_loss = loss, best = lr;
        }
        return best;
    }

private:
    std::vector<GridRun> m_runs;
    std::vector<Method> m_methods;
    std::vector<double> m_lrs;
    int m_steps;
};

inline std::string format(const char* fmt, double a, double b = 0, double c = 0) {
    char buffer[128];
    std::snprintf(buffer, sizeof buffer, fmt, a, b, c);
    return buffer;
}
inline std::string lr_text(double lr) { return format("%g", lr); }

/// The main table in markdown: loss at the report steps and final even-test accuracy, seed mean
/// [min–max], best lr marked.
inline void print_table(std::ostream& out, const Grid& grid) {
    const auto steps = report_steps(grid.steps());
    out << "| method | lr |";
    for (int k : steps) out << " step " << k << " |";
    out << " even test acc |\n|---|---|";
    for (std::size_t i = 0; i < steps.size(); ++i) out << "---|";
    out << "---|\n";
    for (Method m : grid.methods()) {
        const double best = grid.best_lr(m);
        for (double lr : grid.lrs()) {
            out << "| " << method_name(m) << " | " << lr_text(lr) << (lr == best ? " **best**" : "") << " |";
            for (int k : steps) {
                const Spread s = spread(grid.windows(m, lr, k));
                out << format(" %.3f [%.3f–%.3f] |", s.mean, s.min, s.max);
            }
            std::vector<double> acc;
            for (const auto* r : grid.cell(m, lr)) acc.push_back(r->result.even_test_accuracy);
            const Spread a = spread(acc);
            out << format(" %.4f [%.4f–%.4f] |", a.mean, a.min, a.max) << "\n";
        }
    }
    out << "\nBest lr (lowest seed-mean loss over steps " << std::max(1, grid.steps() - 9) << "–" << grid.steps()
        << "):";
    for (Method m : grid.methods()) out << " " << method_name(m) << " " << lr_text(grid.best_lr(m)) << ";";
    out << "\n";
}

/// PiSSA - LoRA at each lr (seed-mean differences; in brackets the seeds, paired, where PiSSA is
/// lower) and the number of windows whose seed mean is lower. Printed only when lora and a PiSSA
/// variant are both in the grid.
inline void print_claim_check(std::ostream& out, const Grid& grid) {
    const auto& ms = grid.methods();
    if (std::find(ms.begin(), ms.end(), Method::lora) == ms.end()) return;
    const auto steps = report_steps(grid.steps());
    const auto ends = window_ends(grid.steps());
    for (Method p : {Method::pissa, Method::pissa_niter_4}) {
        if (std::find(ms.begin(), ms.end(), p) == ms.end()) continue;
        out << "\n"
            << method_name(p) << " − lora (seed-mean difference; seeds where " << method_name(p)
            << " is lower):\n| lr |";
        for (int k : steps) out << " step " << k << " |";
        out << " windows lower |\n|---|";
        for (std::size_t i = 0; i <= steps.size(); ++i) out << "---|";
        out << "\n";
        auto row = [&](const std::string& label, double lr_p, double lr_l) {
            out << "| " << label << " |";
            for (int k : steps) {
                const auto a = grid.windows(p, lr_p, k), b = grid.windows(Method::lora, lr_l, k);
                int lower = 0;
                for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) lower += a[i] < b[i];
                out << format(" %+.3f", spread(a).mean - spread(b).mean) << " (" << lower << "/" << a.size() << ") |";
            }
            int lower_windows = 0;
            for (int k : ends)
                lower_windows +=
                    spread(grid.windows(p, lr_p, k)).mean < spread(grid.windows(Method::lora, lr_l, k)).mean;
            out << " " << lower_windows << "/" << ends.size() << " |\n";
        };
        for (double lr : grid.lrs()) row(lr_text(lr), lr, lr);
        row("best: " + lr_text(grid.best_lr(p)) + " vs " + lr_text(grid.best_lr(Method::lora)), grid.best_lr(p),
            grid.best_lr(Method::lora));
    }
}

/// loss_curves.csv: header method,lr,seed,step,loss; one row per run and step.
inline void write_csv(std::ostream& out, const Grid& grid) {
    out << "method,lr,seed,step,loss\n";
    for (Method m : grid.methods())
        for (double lr : grid.lrs())
            for (const auto* r : grid.cell(m, lr))
                for (std::size_t k = 0; k < r->result.loss.size(); ++k)
                    out << method_name(m) << "," << lr_text(lr) << "," << r->config.seed << "," << (k + 1) << ","
                        << format("%.9g", r->result.loss[k]) << "\n";
}

/// SVG plot (log y) of the 10-step window means at each method's best lr: line = seed mean, band =
/// min–max over seeds. `title` is the first title line.
inline void write_svg(std::ostream& out, const Grid& grid, const std::string& title) {
    const double W = 900, H = 560, left = 80, right = 24, top = 70, bottom = 62;
    const double pw = W - left - right, ph = H - top - bottom;
    const auto ends = window_ends(grid.steps());
    struct Curve {
        Method m;
        double lr;
        std::vector<Spread> points;
    };
    std::vector<Curve> curves;
    double lo = std::numeric_limits<double>::infinity(), hi = 0;
    for (Method m : grid.methods()) {
        Curve c{m, grid.best_lr(m), {}};
        for (int k : ends) {
            c.points.push_back(spread(grid.windows(m, c.lr, k)));
            lo = std::min(lo, c.points.back().min);
            hi = std::max(hi, c.points.back().max);
        }
        curves.push_back(std::move(c));
    }
    if (!(lo > 0) || !(hi > lo)) lo = 0.1, hi = 10;
    const double ylo = std::floor(std::log10(lo) * 10) / 10 - 0.05, yhi = std::ceil(std::log10(hi) * 10) / 10 + 0.05;
    const double xmax = grid.steps();
    auto X = [&](double step) { return left + pw * step / xmax; };
    auto Y = [&](double v) { return top + ph * (yhi - std::log10(v)) / (yhi - ylo); };
    const std::map<Method, std::pair<const char*, const char*>> style = {
        {Method::lora, {"#1f77b4", ""}},
        {Method::pissa, {"#d62728", ""}},
        {Method::pissa_niter_4, {"#ff7f0e", " stroke-dasharray=\"8 4\""}},
        {Method::full, {"#7f7f7f", " stroke-dasharray=\"2 4\""}}};

    out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
        << " " << H << "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"13\">\n"
        << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        << "<text x=\"" << W / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">" << title << "</text>\n"
        << "<text x=\"" << W / 2 << "\" y=\"44\" text-anchor=\"middle\">(line: mean of "
        << grid.cell(grid.methods()[0], grid.lrs()[0]).size() << " seeds; band: min–max)</text>\n";
    // Grid lines and y ticks: decades labelled, 2..9 as minor lines.
    for (int e = static_cast<int>(std::floor(ylo)); e <= static_cast<int>(std::ceil(yhi)); ++e)
        for (int d = 1; d <= 9; ++d) {
            const double v = d * std::pow(10.0, e), lv = std::log10(v);
            if (lv < ylo || lv > yhi) continue;
            const double y = Y(v);
            out << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << y << "\" y2=\"" << y
                << "\" stroke=\"#e5e5e5\"/>\n";
            if (d == 1 || d == 2 || d == 5)
                out << "<text x=\"" << left - 8 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << format("%g", v)
                    << "</text>\n";
        }
    const double xstep = xmax > 150 ? 50 : xmax > 60 ? 20 : xmax > 20 ? 5 : 1;
    for (double s = 0; s <= xmax + 1e-9; s += xstep) {
        out << "<line x1=\"" << X(s) << "\" x2=\"" << X(s) << "\" y1=\"" << top << "\" y2=\"" << top + ph
            << "\" stroke=\"#eeeeee\"/>\n"
            << "<text x=\"" << X(s) << "\" y=\"" << top + ph + 20 << "\" text-anchor=\"middle\">" << format("%g", s)
            << "</text>\n";
    }
    out << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
        << "\" fill=\"none\" stroke=\"black\"/>\n"
        << "<text x=\"" << left + pw / 2 << "\" y=\"" << H - 16
        << "\" text-anchor=\"middle\">fine-tuning step (batch 64)</text>\n"
        << "<text transform=\"translate(22," << top + ph / 2 << ") rotate(-90)\" text-anchor=\"middle\">"
        << "training loss, 10-step window mean (log scale)</text>\n";
    // Bands, then lines on top.
    for (const auto& c : curves) {
        out << "<polygon fill=\"" << style.at(c.m).first << "\" fill-opacity=\"0.18\" stroke=\"none\" points=\"";
        for (std::size_t i = 0; i < ends.size(); ++i) out << X(ends[i]) << "," << Y(c.points[i].max) << " ";
        for (std::size_t i = ends.size(); i-- > 0;) out << X(ends[i]) << "," << Y(c.points[i].min) << " ";
        out << "\"/>\n";
    }
    for (const auto& c : curves) {
        out << "<polyline fill=\"none\" stroke=\"" << style.at(c.m).first << "\" stroke-width=\"2.2\""
            << style.at(c.m).second << " points=\"";
        for (std::size_t i = 0; i < ends.size(); ++i) out << X(ends[i]) << "," << Y(c.points[i].mean) << " ";
        out << "\"/>\n";
    }
    // Legend, top right.
    const double lx = left + pw - 230, ly = top + 12;
    out << "<rect x=\"" << lx << "\" y=\"" << ly << "\" width=\"218\" height=\"" << 24 * curves.size() + 10
        << "\" fill=\"white\" fill-opacity=\"0.9\" stroke=\"#cccccc\"/>\n";
    for (std::size_t i = 0; i < curves.size(); ++i) {
        const double y = ly + 20 + 24 * static_cast<double>(i);
        out << "<line x1=\"" << lx + 10 << "\" x2=\"" << lx + 50 << "\" y1=\"" << y << "\" y2=\"" << y << "\" stroke=\""
            << style.at(curves[i].m).first << "\" stroke-width=\"2.2\"" << style.at(curves[i].m).second << "/>\n"
            << "<text x=\"" << lx + 58 << "\" y=\"" << y + 4 << "\">" << method_name(curves[i].m) << " (lr "
            << lr_text(curves[i].lr) << ")</text>\n";
    }
    out << "</svg>\n";
}

}  // namespace fmnist
