// docs/metrics.md is the one list of metrics (issue 8): what every kind of service exports on a
// live local cluster must be exactly what the list gives for that kind, with the listed type and
// label names, in both directions. A family the code adds without a line in the list fails here,
// and so does a listed family that no service exports any more.
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cli/local_cluster.h"
#include "expertmesh/v1/attention_worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/testing/child_process.h"
#include "tests/testing/prom_text.h"

namespace expertmesh {
namespace {

// The pseudo-kind of the "## Every service" section: its families belong to every kind.
constexpr char kEveryService[] = "*";

// Section headings of docs/metrics.md and the LocalCluster member kind each one describes.
const std::map<std::string, std::string>& SectionKinds() {
  static const auto* kinds = new std::map<std::string, std::string>{
      {"Every service", kEveryService},
      {"Router", "router"},
      {"Gateway", "gateway"},
      {"Attention worker", "attention-worker"},
      {"Expert worker", "expert-worker"},
      {"KV store", "kv-store"},
  };
  return *kinds;
}

struct DocMetric {
  std::string type;
  std::set<std::string> labels;
  int line = 0;
};

// kind (or kEveryService) -> family name -> what the list says.
using MetricList = std::map<std::string, std::map<std::string, DocMetric>>;

std::set<std::string> BackquotedWords(const std::string& cell) {
  std::set<std::string> out;
  std::vector<std::string> parts = absl::StrSplit(cell, '`');
  for (size_t i = 1; i < parts.size(); i += 2) out.insert(parts[i]);
  return out;
}

// Reads the tables of docs/metrics.md: under each "## <section>" heading of SectionKinds(),
// rows of the form "| `name` | type | `label`, ... or - | meaning |". Every section must be
// present (an empty one says the kind has no families of its own); a metric row outside them, an
// unknown type, a malformed label cell or a name listed twice is an error naming the line.
absl::StatusOr<MetricList> ParseMetricList(const std::string& text) {
  MetricList list;
  std::set<std::string> seen_sections;
  std::map<std::string, int> first_line;  // every name, across sections
  std::string kind;  // "" outside a known section
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (absl::StartsWith(line, "## ")) {
      const std::string title(absl::StripAsciiWhitespace(line.substr(3)));
      auto it = SectionKinds().find(title);
      kind = it == SectionKinds().end() ? "" : it->second;
      if (!kind.empty()) {
        if (!seen_sections.insert(title).second) {
          return absl::InvalidArgumentError(absl::StrCat("line ", n, ": section '", title,
                                                         "' appears twice"));
        }
        list[kind];
      }
      continue;
    }
    if (!absl::StartsWith(line, "| `")) continue;
    std::vector<std::string> cells = absl::StrSplit(line, '|');
    // "| a | b | c | d |" splits into "", a, b, c, d, "".
    if (cells.size() < 6) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", n, ": a metric row needs name, type, labels and meaning"));
    }
    const std::set<std::string> names = BackquotedWords(cells[1]);
    if (names.size() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", n, ": the name cell must hold one `name`"));
    }
    const std::string name = *names.begin();
    if (kind.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", n, ": metric '", name, "' is not under a service section heading"));
    }
    DocMetric m;
    m.line = n;
    m.type = std::string(absl::StripAsciiWhitespace(cells[2]));
    static const std::set<std::string> kTypes = {"counter", "gauge", "histogram", "summary"};
    if (kTypes.count(m.type) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("line ", n, ": metric '", name, "' has unknown type '", m.type, "'"));
    }
    const std::string labels(absl::StripAsciiWhitespace(cells[3]));
    if (labels != "-") {
      m.labels = BackquotedWords(labels);
      if (m.labels.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "line ", n, ": metric '", name, "' labels must be `name`s or '-', not '", labels,
            "'"));
      }
    }
    auto [prev, fresh] = first_line.emplace(name, n);
    if (!fresh) {
      return absl::InvalidArgumentError(absl::StrCat("line ", n, ": metric '", name,
                                                     "' is already listed on line ",
                                                     prev->second));
    }
    list[kind][name] = std::move(m);
  }
  for (const auto& [title, k] : SectionKinds()) {
    if (seen_sections.count(title) == 0) {
      return absl::InvalidArgumentError("no '## " + title + "' section");
    }
  }
  return list;
}

const std::string kDocPath = std::string(EM_SOURCE_DIR) + "/docs/metrics.md";

absl::StatusOr<MetricList> LoadMetricList() {
  std::ifstream f(kDocPath);
  if (!f) return absl::NotFoundError("cannot read " + kDocPath);
  std::stringstream ss;
  ss << f.rdbuf();
  absl::StatusOr<MetricList> list = ParseMetricList(ss.str());
  if (!list.ok()) {
    return absl::Status(list.status().code(),
                        absl::StrCat(kDocPath, ": ", list.status().message()));
  }
  return list;
}

// What the list says a member of `kind` exports: the every-service families and its own.
std::map<std::string, DocMetric> Expected(const MetricList& list, const std::string& kind) {
  std::map<std::string, DocMetric> out = list.at(kEveryService);
  for (const auto& [name, m] : list.at(kind)) out[name] = m;
  return out;
}

// The family a sample belongs to: its own name, or for histogram and summary series the name
// without _bucket/_sum/_count. "" if the scrape declares none.
std::string FamilyOf(const testing::PromScrape& scrape, const std::string& sample) {
  if (scrape.families.count(sample)) return sample;
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    if (absl::EndsWith(sample, suffix)) {
      std::string base = sample.substr(0, sample.size() - std::string(suffix).size());
      auto it = scrape.families.find(base);
      if (it != scrape.families.end() &&
          (it->second.type == "histogram" || it->second.type == "summary")) {
        return base;
      }
    }
  }
  return "";
}

std::string Braced(const std::set<std::string>& s) {
  return "{" + absl::StrJoin(s, ",") + "}";
}

// Compares one member's scrape with the list; returns every mismatch, one per line ("" = none).
std::string Compare(const std::string& member, const testing::PromScrape& scrape,
                    const std::map<std::string, DocMetric>& expected) {
  std::vector<std::string> undocumented, missing, problems;
  for (const auto& [name, family] : scrape.families) {
    auto it = expected.find(name);
    if (it == expected.end()) {
      undocumented.push_back(name + " (" + family.type + ")");
    } else if (it->second.type != family.type) {
      problems.push_back(absl::StrCat(name, ": exported as ", family.type, ", docs/metrics.md:",
                                      it->second.line, " says ", it->second.type));
    }
  }
  for (const auto& [name, m] : expected) {
    if (scrape.families.count(name) == 0) missing.push_back(name);
  }
  // Label names, sample by sample; `le` and `quantile` are the exposition format's own.
  std::map<std::string, std::set<std::string>> reported;  // one problem per family and label set
  for (const testing::PromSample& s : scrape.samples) {
    const std::string family = FamilyOf(scrape, s.name);
    if (family.empty()) {
      problems.push_back("sample " + s.name + " has no # TYPE family");
      continue;
    }
    auto it = expected.find(family);
    if (it == expected.end()) continue;  // already reported as undocumented
    std::set<std::string> labels;
    for (const auto& [k, v] : s.labels) {
      if (k == "le" && absl::EndsWith(s.name, "_bucket")) continue;
      if (k == "quantile" && scrape.families.at(family).type == "summary") continue;
      labels.insert(k);
    }
    if (labels != it->second.labels && reported[family].insert(Braced(labels)).second) {
      problems.push_back(absl::StrCat(family, ": exported with labels ", Braced(labels),
                                      ", docs/metrics.md:", it->second.line, " lists ",
                                      Braced(it->second.labels)));
    }
  }
  std::string out;
  if (!undocumented.empty()) {
    out += member + " exports families docs/metrics.md does not list for it: " +
           absl::StrJoin(undocumented, ", ") + "\n";
  }
  if (!missing.empty()) {
    out += member + " does not export families docs/metrics.md lists for it: " +
           absl::StrJoin(missing, ", ") + "\n";
  }
  for (const std::string& p : problems) out += member + ": " + p + "\n";
  return out;
}

TEST(MetricListDocTest, ParserReadsRowsAndRejectsWhatItCannotCheck) {
  std::string ok;
  for (const auto& [title, kind] : SectionKinds()) ok += "## " + title + "\n";
  ok += "## Router\n";
  EXPECT_FALSE(ParseMetricList(ok).ok()) << "a repeated section must be refused";

  std::string doc = "# Metrics\n| `stray_total` | counter | - | x |\n";
  for (const auto& [title, kind] : SectionKinds()) doc += "## " + title + "\n";
  EXPECT_FALSE(ParseMetricList(doc).ok()) << "a row outside every section must be refused";

  doc.clear();
  for (const auto& [title, kind] : SectionKinds()) {
    doc += "## " + title + "\n| name | type | labels | meaning |\n|---|---|---|---|\n";
    if (kind == "router") {
      doc += "| `expertmesh_router_x_total` | counter | `kind`, `state` | a `b` c |\n";
      doc += "| `expertmesh_router_y` | gauge | - | y |\n";
    }
  }
  auto list = ParseMetricList(doc);
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->at("router").size(), 2u);
  EXPECT_EQ(list->at("router").at("expertmesh_router_x_total").type, "counter");
  EXPECT_EQ(list->at("router").at("expertmesh_router_x_total").labels,
            (std::set<std::string>{"kind", "state"}));
  EXPECT_TRUE(list->at("router").at("expertmesh_router_y").labels.empty());
  EXPECT_TRUE(list->at("gateway").empty());

  for (const std::string& bad : {
           std::string("| `expertmesh_router_z` | countr | - | typo |\n"),
           std::string("| `expertmesh_router_z` | gauge | kind | labels not quoted |\n"),
           std::string("| `expertmesh_router_y` | gauge | - | listed twice |\n"),
           std::string("| `expertmesh_router_z` | gauge |\n"),
       }) {
    EXPECT_FALSE(ParseMetricList(doc + bad).ok()) << bad;
  }
}

// The names follow the convention the issue asks for, so that a dashboard can find a component's
// families by prefix: expertmesh_<component>_..., counters ending in _total.
TEST(MetricListDocTest, NamesFollowTheConvention) {
  auto list = LoadMetricList();
  ASSERT_TRUE(list.ok()) << list.status();
  const std::map<std::string, std::string> prefixes = {
      {"router", "expertmesh_router_"},
      {"gateway", "expertmesh_gateway_"},
      {"attention-worker", "expertmesh_attention_"},
      {"expert-worker", "expertmesh_expert_"},
      {"kv-store", "expertmesh_kv_"},
  };
  for (const auto& [kind, metrics] : *list) {
    for (const auto& [name, m] : metrics) {
      if (kind == kEveryService) {
        // Families we do not name (process_*, prometheus-cpp's exposer_*) and the build info.
        EXPECT_TRUE(!absl::StartsWith(name, "expertmesh_") || name == "expertmesh_build_info")
            << name << " (docs/metrics.md:" << m.line << ") belongs to one component";
      } else {
        EXPECT_TRUE(absl::StartsWith(name, prefixes.at(kind)))
            << name << " (docs/metrics.md:" << m.line << ") should start with "
            << prefixes.at(kind);
      }
      if (m.type == "counter") {
        EXPECT_TRUE(absl::EndsWith(name, "_total"))
            << name << " (docs/metrics.md:" << m.line << ") is a counter without _total";
      } else {
        EXPECT_FALSE(absl::EndsWith(name, "_total"))
            << name << " (docs/metrics.md:" << m.line << ") ends in _total but is a " << m.type;
      }
    }
  }
}

// What issue 8 asks the services to export (dispatches, tokens per (layer, expert) on expert
// workers only, dispatch latency, retries, placement version, batch size, scheduler queue,
// resident weight bytes) is in the list, and so, by the live test below, exported.
TEST(MetricListDocTest, ListsWhatIssue8Adds) {
  auto list = LoadMetricList();
  ASSERT_TRUE(list.ok()) << list.status();
  struct Want {
    std::string kind, name, type;
    std::set<std::string> labels;
  };
  const std::vector<Want> wants = {
      {"expert-worker", "expertmesh_expert_dispatches_total", "counter", {"result"}},
      {"expert-worker", "expertmesh_expert_tokens_total", "counter", {"layer", "expert"}},
      {"expert-worker", "expertmesh_expert_dispatch_seconds", "histogram", {}},
      {"expert-worker", "expertmesh_expert_dispatch_rows", "histogram", {}},
      {"expert-worker", "expertmesh_expert_resident_weight_bytes", "gauge", {}},
      {"attention-worker", "expertmesh_attention_expert_dispatches_total", "counter", {"result"}},
      {"attention-worker", "expertmesh_attention_expert_dispatch_seconds", "histogram", {}},
      {"attention-worker", "expertmesh_attention_expert_dispatch_retries_total", "counter", {}},
      {"attention-worker", "expertmesh_attention_placement_version", "gauge", {}},
      {"attention-worker", "expertmesh_attention_batch_tokens", "histogram", {}},
      {"attention-worker", "expertmesh_attention_queued_sequences", "gauge", {}},
      {"attention-worker", "expertmesh_attention_resident_weight_bytes", "gauge", {}},
      {"router", "expertmesh_router_placement_version", "gauge", {}},
  };
  for (const Want& w : wants) {
    auto it = list->at(w.kind).find(w.name);
    ASSERT_NE(it, list->at(w.kind).end()) << w.name << " is not listed for " << w.kind;
    EXPECT_EQ(it->second.type, w.type) << w.name;
    EXPECT_EQ(it->second.labels, w.labels) << w.name;
  }
  // Per-(layer, expert) series stay on the expert workers: a real model has tens of thousands.
  for (const auto& [kind, metrics] : *list) {
    if (kind == "expert-worker") continue;
    for (const auto& [name, m] : metrics) {
      EXPECT_FALSE(m.labels.count("layer") && m.labels.count("expert"))
          << name << " (docs/metrics.md:" << m.line << ") has per-(layer, expert) series outside "
          << "the expert workers";
    }
  }
}

class MetricListClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cli::LocalClusterOptions o =
        cli::SmallClusterOptions(std::string(EM_SHARED_DIR) + "/golden/tiny-a", 1, 2);
    o.bin_dir = EM_BINARY_DIR;
    o.with_kv_store = true;
    o.with_gateway = true;
    o.ready_timeout = absl::Seconds(120);  // a loaded 2-core CI machine
    auto c = cli::LocalCluster::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    cluster_ = std::move(*c);
  }

  // Runs one short greedy sequence on the attention worker; returns the tokens it streamed.
  // The worker answers UNAVAILABLE until the expert placement covers the model (it serves health
  // checks before that), so an UNAVAILABLE first try is retried within a bounded wait.
  std::vector<uint32_t> Generate(const std::string& id, int max_new_tokens) {
    auto stub = expertmesh::v1::AttentionWorker::NewStub(
        grpc::CreateChannel(cluster_->attention_worker_addresses().at(0),
                            grpc::InsecureChannelCredentials()));
    expertmesh::v1::SequenceRequest req;
    req.set_sequence_id(id);
    for (uint32_t t : {11u, 42u, 7u, 300u, 5u}) req.add_prompt_ids(t);
    req.mutable_sampling()->set_max_new_tokens(static_cast<uint32_t>(max_new_tokens));
    const absl::Time give_up = absl::Now() + absl::Seconds(120);
    while (true) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      auto reader = stub->Generate(&ctx, req);
      std::vector<uint32_t> tokens;
      expertmesh::v1::SequenceTokens msg;
      while (reader->Read(&msg)) {
        tokens.insert(tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
      }
      const grpc::Status st = reader->Finish();
      if (st.error_code() == grpc::StatusCode::UNAVAILABLE && tokens.empty() &&
          absl::Now() < give_up) {
        absl::SleepFor(absl::Milliseconds(100));
        continue;
      }
      EXPECT_TRUE(st.ok()) << id << ": " << st.error_message();
      return tokens;
    }
  }

  testing::PromScrape Scrape(const cli::ClusterMember& m) {
    auto r = testing::HttpRequest(m.metrics_port, "GET", "/metrics");
    EXPECT_TRUE(r.ok()) << m.name << ": " << r.status();
    if (!r.ok()) return {};
    EXPECT_EQ(r->status, 200) << m.name;
    auto parsed = testing::ParsePromText(r->body);
    EXPECT_TRUE(parsed.ok()) << m.name << ": " << parsed.status();
    return parsed.ok() ? *parsed : testing::PromScrape{};
  }

  std::unique_ptr<cli::LocalCluster> cluster_;
};

TEST_F(MetricListClusterTest, EveryServiceExportsExactlyTheListedFamilies) {
  auto list = LoadMetricList();
  ASSERT_TRUE(list.ok()) << list.status();

  // Families whose series appear with their first event: finished sequences and HTTP requests.
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(Generate("metrics-" + std::to_string(i), 3).size(), 3u) << "request " << i;
  }
  const cli::ClusterMember* gateway = cluster_->Find("gateway");
  ASSERT_NE(gateway, nullptr);
  auto health = testing::HttpRequest(gateway->http_port, "GET", "/health");
  ASSERT_TRUE(health.ok()) << health.status();

  std::set<std::string> kinds_seen;
  std::string mismatches;
  double expert_tokens = 0;
  for (const cli::ClusterMember& m : cluster_->members()) {
    SCOPED_TRACE(m.name);
    ASSERT_TRUE(list->count(m.kind)) << "docs/metrics.md has no section for kind " << m.kind;
    kinds_seen.insert(m.kind);
    const testing::PromScrape scrape = Scrape(m);
    ASSERT_FALSE(scrape.families.empty()) << m.name << " exported nothing";
    mismatches += Compare(m.name, scrape, Expected(*list, m.kind));
    if (m.kind == "expert-worker") {
      for (const auto& s : scrape.Find("expertmesh_expert_tokens_total")) expert_tokens += s.value;
    }
  }
  EXPECT_EQ(mismatches, "") << "docs/metrics.md (" << kDocPath
                            << ") and the services disagree:\n"
                            << mismatches;
  // Every section of the list was checked against a live member of its kind.
  for (const auto& [title, kind] : SectionKinds()) {
    if (kind != kEveryService) {
      EXPECT_TRUE(kinds_seen.count(kind)) << "no live " << kind;
    }
  }
  // The generated tokens went through the expert workers, so the per-(layer, expert) counters
  // were not only created but counted.
  EXPECT_GT(expert_tokens, 0);
}

}  // namespace
}  // namespace expertmesh
