// `pissa init --shard` and `--resume` end to end: shards run as concurrent processes (plain, under
// mpirun, from launcher variables) give the bytes of a single run for a single-file model, a sharded
// model and GPT-2 Conv1D weights; runs killed with SIGKILL at any moment and resumed give the same
// bytes; `pissa join` and the refusals exit as documented.
#include "cli/cli_support.hpp"

#include <doctest/doctest.h>

#include <map>

using namespace pissa_cli_test;

namespace {

/// Every file under `dir` (relative path -> bytes).
std::map<std::string, std::string> files_under(const fs::path& dir) {
    std::map<std::string, std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(dir))
        if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = pissa_test::read_bytes(e.path());
    return out;
}

/// `count` shard processes of `init <args> --out <out>` started together; their exit codes joined by spaces.
std::string run_shards_concurrently(const ScratchDir& dir, const std::string& args, const std::string& out, int count) {
    std::string script;
    for (int k = 0; k < count; ++k)
        script += "\"$PISSA\" init " + args + " --out " + out + " --shard " + std::to_string(k) + "/" +
                  std::to_string(count) + " > " + out + "." + std::to_string(k) + ".log 2>&1 & p" + std::to_string(k) +
                  "=$!; ";
    script += "codes=\"\"; ";
    for (int k = 0; k < count; ++k) script += "wait $p" + std::to_string(k) + "; codes=\"$codes$? \"; ";
    script += "echo $codes > " + out + ".codes";
    shell(dir, script);
    return pissa_test::read_bytes(dir / (out + ".codes"));
}

}  // namespace

TEST_CASE("init --shard K/N as concurrent processes: the bytes of a single run (file, sharded model, Conv1D)") {
    ScratchDir dir("cli-shards");
    const std::string model_args = "--layers 3 --hidden 64 --intermediate 96 --vocab 128 --heads 4";
    REQUIRE(pissa_run(dir, "generate --out one " + model_args).code == 0);
    REQUIRE(pissa_run(dir, "generate --out three --shards 3 " + model_args).code == 0);
    REQUIRE(pissa_run(dir, "generate --out gpt2 --arch gpt2 --layers 3 --hidden 64 --vocab 128 --heads 4").code == 0);
    const std::vector<std::pair<std::string, std::string>> jobs = {
        {"one", "--rank 4 --targets q_proj,v_proj,down_proj"},
        {"three", "--rank 4 --targets q_proj,k_proj,gate_proj --seed 9"},
        {"gpt2", "--rank 4 --targets c_attn,c_fc --fan-in-fan-out --exact"}};
    for (const auto& [model, options] : jobs) {
        CAPTURE(model);
        REQUIRE(pissa_run(dir, "init " + model + " " + options + " --out " + model + "-single").code == 0);
        const auto expected = files_under(dir / (model + "-single"));
        for (int count : {1, 2, 3, 5, 40}) {  // 40: more shards than tensors and files
            CAPTURE(count);
            const std::string out = model + "-" + std::to_string(count);
            std::string all_zero = "0";
            for (int k = 1; k < count; ++k) all_zero += " 0";
            CHECK(run_shards_concurrently(dir, model + " " + options, out, count) == all_zero + "\n");
            CHECK(files_under(dir / out) == expected);
            CHECK_FALSE(fs::exists(dir / ("." + out + ".pissa-work")));
        }
    }
}

TEST_CASE("init --shard auto under mpirun and from launcher variables") {
    ScratchDir dir("cli-shard-auto");
    REQUIRE(pissa_run(dir, "generate --out m --shards 2 " + small_llama).code == 0);
    REQUIRE(pissa_run(dir, "init m --out single --rank 4").code == 0);
    const auto expected = files_under(dir / "single");

    // Open MPI on loopback (as root it must be allowed explicitly)
    const int has_mpirun = shell(dir, "command -v mpirun > /dev/null");
    REQUIRE_MESSAGE(has_mpirun == 0, "mpirun not found: scripts/install-deps.sh installs Debian's openmpi-bin");
    for (int np : {2, 3}) {
        const std::string out = "mpi" + std::to_string(np);
        CHECK(shell(dir, "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np " + std::to_string(np) +
                             " --oversubscribe \"$PISSA\" init m --out " + out + " --rank 4 --shard auto > " + out +
                             ".log 2>&1") == 0);
        CHECK(files_under(dir / out) == expected);
    }
    // Slurm array tasks, ranks and Kubernetes Indexed Jobs, one process after another
    const std::vector<std::string> launchers = {"SLURM_ARRAY_TASK_ID=1 SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_COUNT=2",
                                                "SLURM_ARRAY_TASK_ID=2 SLURM_ARRAY_TASK_MIN=1 SLURM_ARRAY_TASK_COUNT=2",
                                                "PMI_RANK=0 PMI_SIZE=2",
                                                "PMI_RANK=1 PMI_SIZE=2",
                                                "SLURM_PROCID=1 SLURM_NTASKS=2",
                                                "SLURM_PROCID=0 SLURM_NTASKS=2"};
    for (std::size_t i = 0; i < launchers.size(); i += 2) {
        const std::string out = "env" + std::to_string(i);
        CHECK(shell(dir, launchers[i] + " \"$PISSA\" init m --out " + out + " --rank 4 --shard auto > log 2>&1") == 0);
        CHECK(pissa_test::read_bytes(dir / "log").find("waiting for shards") != std::string::npos);
        CHECK(shell(dir, launchers[i + 1] + " \"$PISSA\" init m --out " + out + " --rank 4 --shard auto > log") == 0);
        CHECK(files_under(dir / out) == expected);
    }
    CHECK(shell(dir, "JOB_COMPLETION_INDEX=1 \"$PISSA\" init m --out k8s --rank 4 --shard auto/2 > log") == 0);
    CHECK(shell(dir, "JOB_COMPLETION_INDEX=0 \"$PISSA\" init m --out k8s --rank 4 --shard auto/2 > log") == 0);
    CHECK(files_under(dir / "k8s") == expected);
    // no launcher: exit 2, nothing written
    const Run none = pissa_run(dir, "init m --out none --rank 4 --shard auto");
    CHECK(none.code == 2);
    CHECK(none.err.find("no launcher found") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "none"));
    CHECK_FALSE(fs::exists(dir / ".none.pissa-work"));
}

TEST_CASE("the scale-out examples run: the Slurm array script, the mpirun script, the Indexed Job's command") {
    ScratchDir dir("cli-examples");
    REQUIRE(pissa_run(dir, "generate --out m " + small_llama).code == 0);
    REQUIRE(pissa_run(dir, "init m --out single --rank 4 --targets q_proj,o_proj").code == 0);
    const auto expected = files_under(dir / "single");
    const std::string examples = PISSA_EXAMPLES "/scale-out/";
    const std::string env = "MODEL=m PISSA=\"$PISSA\" OPTIONS=\"--rank 4 --targets q_proj,o_proj\" ";
    // two array tasks, one after the other (the script's #SBATCH lines are comments to bash)
    for (const char* task : {"4", "3"})
        CHECK(shell(dir, env + "OUT=slurm SLURM_ARRAY_TASK_ID=" + task +
                             " SLURM_ARRAY_TASK_MIN=3 SLURM_ARRAY_TASK_COUNT=2 SLURM_CPUS_PER_TASK=1 bash " + examples +
                             "slurm-array.sbatch > log 2>&1") == 0);
    CHECK(files_under(dir / "slurm") == expected);
    CHECK(shell(dir, env + "OUT=mpi NP=3 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 bash " + examples +
                         "mpirun.sh > log 2>&1") == 0);
    CHECK(files_under(dir / "mpi") == expected);
    // the Indexed Job's pods run `pissa init ... --shard auto/8 --resume` with JOB_COMPLETION_INDEX set
    const std::string manifest = pissa_test::read_bytes(examples + "kubernetes-indexed-job.yaml");
    CHECK(manifest.find("completionMode: Indexed") != std::string::npos);
    CHECK(manifest.find("completions: 8") != std::string::npos);
    CHECK(manifest.find("- auto/8") != std::string::npos);
    for (int index = 7; index >= 0; --index)
        CHECK(shell(dir, "JOB_COMPLETION_INDEX=" + std::to_string(index) +
                             " \"$PISSA\" init m --out k8s --rank 4 --targets q_proj,o_proj --shard auto/8 --resume "
                             "> log") == 0);
    CHECK(files_under(dir / "k8s") == expected);
}

TEST_CASE("init --resume after SIGKILL at any moment: the bytes of an uninterrupted run") {
    ScratchDir dir("cli-kill");
    REQUIRE(
        pissa_run(dir, "generate --out m --shards 2 --layers 2 --hidden 512 --intermediate 1024 --vocab 64 --heads 8")
            .code == 0);
    const std::string options = "--rank 32 --exact --threads 1 --targets q_proj,k_proj,v_proj,o_proj,up_proj,down_proj";
    REQUIRE(pissa_run(dir, "init m --out single " + options).code == 0);
    const auto expected = files_under(dir / "single");
    int resumed_with_work = 0;
    for (const char* delay : {"0.02", "0.3", "0.6", "1.0", "1.5"}) {
        CAPTURE(delay);
        fs::remove_all(dir / "out");
        // killed outright: no handler runs, whatever was flushed is all there is (waited for, so
        // that its locks are gone before the resume starts)
        shell(dir, "\"$PISSA\" init m --out out --resume " + options + " > /dev/null 2>&1 & pid=$!; sleep " + delay +
                       "; kill -KILL $pid; wait $pid");
        const Run r = pissa_run(dir, "init m --out out --resume " + options);
        CHECK_MESSAGE(r.code == 0, r.err);
        if (r.out.find("resumed: ") != std::string::npos) ++resumed_with_work;
        CHECK(files_under(dir / "out") == expected);
        CHECK_MESSAGE(!fs::exists(dir / ".out.pissa-work"), r.out);
    }
    CHECK(resumed_with_work >= 1);  // at least one kill landed after some modules were done

    // a shard killed outright, resumed; the last shard joins
    fs::remove_all(dir / "out");
    shell(dir, "\"$PISSA\" init m --out out --shard 0/2 " + options +
                   " > /dev/null 2>&1 & pid=$!; sleep 0.5; "
                   "kill -KILL $pid; wait $pid");
    CHECK(pissa_run(dir, "init m --out out --shard 1/2 " + options).code == 0);
    CHECK(pissa_run(dir, "init m --out out --shard 0/2 --resume " + options).code == 0);
    CHECK(files_under(dir / "out") == expected);
}

TEST_CASE("pissa join, resume refusals and no-ops, exit codes and JSON") {
    ScratchDir dir("cli-join");
    REQUIRE(pissa_run(dir, "generate --out m --shards 2 " + small_llama).code == 0);
    Run r = pissa_run(dir, "init m --out o --rank 4 --shard 0/2 --json");
    REQUIRE(r.code == 0);
    const auto report = nlohmann::json::parse(r.out);
    CHECK(report["complete"] == false);
    CHECK(report["waiting_for"] == nlohmann::json::array({1}));
    CHECK(report["shard"]["index"] == 0);
    CHECK(report["shard"]["count"] == 2);

    r = pissa_run(dir, "join o");
    CHECK(r.code == 2);
    CHECK(r.err.find("shards 1 of 2 have not finished") != std::string::npos);
    r = pissa_run(dir, "init m --out o --rank 5 --shard 1/2");
    CHECK(r.code == 2);
    CHECK(r.err.find("another job") != std::string::npos);
    r = pissa_run(dir, "init m --out o --rank 4 --shard 1/2 --json");
    CHECK(r.code == 0);
    CHECK(nlohmann::json::parse(r.out)["complete"] == true);
    CHECK(nlohmann::json::parse(r.out)["modules"].size() == 4);
    r = pissa_run(dir, "join o");
    CHECK(r.code == 2);
    CHECK(r.err.find("no job to join") != std::string::npos);

    // --resume on a complete output: nothing to do with the same options, exit 2 with others
    r = pissa_run(dir, "init m --out o --rank 4 --resume");
    CHECK(r.code == 0);
    CHECK(r.out.find("nothing to do") != std::string::npos);
    r = pissa_run(dir, "init m --out o --rank 8 --resume");
    CHECK(r.code == 2);
    CHECK(r.err.find("other options") != std::string::npos);

    for (const char* bad : {"--shard 2/2", "--shard x", "--shard 1/0", "--shard auto/0"}) {
        r = pissa_run(dir, std::string("init m --out p --rank 4 ") + bad);
        CHECK_MESSAGE(r.code == 2, bad);
        CHECK_MESSAGE(r.err.find("--shard") != std::string::npos, bad, ": ", r.err);
    }
    CHECK(entries(dir.path()) == std::set<std::string>{"m", "o"});
}
