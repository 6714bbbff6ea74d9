#include "cli_args.h"

#include <algorithm>
#include <cstdint>
#include <sstream>

namespace nbdsnap::cli {
namespace {

constexpr std::string_view kTool = "nbdsnap";
constexpr std::string_view kGlobalSynopsis = "nbdsnap [--api PATH] [--json]";
constexpr size_t kWidth = 79;

std::vector<std::string_view> words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && s[i] == ' ') ++i;
    size_t j = i;
    while (j < s.size() && s[j] != ' ') ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

// Wraps TEXT to kWidth columns, every line indented by INDENT. Lines of TEXT
// are kept; a line's own leading spaces become its hanging indent.
std::string wrap(std::string_view text, size_t indent) {
  std::string out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    size_t lead = 0;
    while (lead < line.size() && line[lead] == ' ') ++lead;
    std::string pad(indent + lead, ' ');
    std::string cur = pad;
    bool first = true;
    for (auto w : words(line)) {
      if (!first && cur.size() + 1 + w.size() > kWidth) {
        out += cur + "\n";
        cur = pad;
        first = true;
      }
      if (!first) cur += ' ';
      cur += w;
      first = false;
    }
    out += (line.empty() ? std::string() : cur) + "\n";
    if (nl == std::string_view::npos) break;
    pos = nl + 1;
  }
  return out;
}

// "  LEFT   summary" rows with a common left column, wrapped.
std::string table(const std::vector<std::pair<std::string, std::string_view>>& rows) {
  size_t left = 0;
  for (const auto& r : rows) left = std::max(left, r.first.size());
  left = std::min<size_t>(left, 38);
  std::string out;
  for (const auto& r : rows) {
    std::string head = "  " + r.first;
    if (r.first.size() > left) {
      // A long synopsis: its words filled to the width, then the summary.
      std::vector<std::string> units;  // "[--opt VALUE]" stays together
      for (auto w : words(r.first)) {
        if (!units.empty() && units.back()[0] == '[' && units.back().back() != ']')
          units.back() += " " + std::string(w);
        else
          units.emplace_back(w);
      }
      std::string line = " ";
      for (const auto& w : units) {
        if (line.size() + 1 + w.size() > kWidth) {
          out += line + "\n";
          line = "     ";
        }
        line += " " + w;
      }
      out += line + "\n";
      out += wrap(r.second, left + 4);
    } else {
      std::string body = wrap(r.second, left + 4);
      out += head + body.substr(head.size());
    }
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------ CommandSpec

std::string CommandSpec::path() const {
  return group.empty() ? std::string(name) : std::string(group) + " " + std::string(name);
}

std::string CommandSpec::synopsis() const {
  std::string s = path();
  if (!args.empty()) s += " " + std::string(args);
  for (const auto& o : options) {
    std::string one = o.value.empty() ? std::string(o.name) : std::string(o.name) + " " + std::string(o.value);
    s += o.required ? " " + one : " [" + one + "]";
  }
  return s;
}

size_t CommandSpec::min_args() const {
  auto w = words(args);
  return static_cast<size_t>(std::count_if(w.begin(), w.end(), [](std::string_view a) { return a[0] != '['; }));
}

size_t CommandSpec::max_args() const {
  auto w = words(args);
  if (!w.empty() && (ends_with(w.back(), "...") || ends_with(w.back(), "...]"))) return SIZE_MAX;
  return w.size();
}

const OptionSpec* CommandSpec::option(std::string_view n) const {
  for (const auto& o : options)
    if (o.name == n) return &o;
  return nullptr;
}

const CommandSpec* find_command(std::string_view group, std::string_view name) {
  for (const auto& c : commands())
    if (c.group == group && c.name == name) return &c;
  return nullptr;
}

const GroupSpec* find_group(std::string_view name) {
  for (const auto& g : groups())
    if (g.name == name) return &g;
  return nullptr;
}

// ----------------------------------------------------------------- parsing

ParsedArgs parse_args(const std::vector<std::string>& argv) {
  ParsedArgs p;
  bool help = false, version = false, literal = false;
  std::string error;
  auto fail = [&](std::string msg) {
    if (error.empty()) error = std::move(msg);
  };

  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& w = argv[i];
    if (!literal && w == "--") {
      literal = true;
      continue;
    }
    if (!literal && w.size() > 1 && w[0] == '-') {
      std::string name = w;
      std::optional<std::string> inline_value;
      if (starts_with(w, "--")) {
        auto eq = w.find('=');
        if (eq != std::string::npos) {
          name = w.substr(0, eq);
          inline_value = w.substr(eq + 1);
        }
      }
      // The option's value: "--opt=VALUE" or the next word.
      auto value = [&]() -> std::optional<std::string> {
        if (inline_value) {
          if (inline_value->empty()) {
            fail(name + " needs a value");
            return std::nullopt;
          }
          return inline_value;
        }
        if (i + 1 >= argv.size() || argv[i + 1].empty()) {
          fail(name + " needs a value");
          return std::nullopt;
        }
        return argv[++i];
      };
      auto flag = [&](bool* out) {
        if (inline_value) fail(name + " takes no value");
        *out = true;
      };
      if (name == "--help" || name == "-h") {
        flag(&help);
      } else if (name == "--version") {
        flag(&version);
      } else if (name == "--json") {
        flag(&p.json);
      } else if (name == "--api") {
        if (auto v = value()) p.api = *v;
      } else if (const OptionSpec* o = p.command ? p.command->option(name) : nullptr) {
        std::optional<std::string> v;
        if (o->value.empty()) {
          bool set = false;
          flag(&set);
          v = "";
        } else {
          v = value();
        }
        if (v && !p.options.emplace(name, *v).second) fail(name + " given twice");
      } else {
        fail("unknown option " + name);
      }
      continue;
    }
    // A word.
    if (!p.command && !p.group) {
      if ((p.group = find_group(w))) continue;
      if ((p.command = find_command("", w))) continue;
      if (error.empty()) fail("unknown command '" + w + "'");
      literal = true;  // the rest is not ours to interpret; still honour --help before it
      break;
    }
    if (!p.command) {
      if ((p.command = find_command(p.group->name, w))) continue;
      fail("unknown command '" + w + "'");
      break;
    }
    if (w.empty()) fail("empty argument");
    p.args.push_back(w);
  }

  if (p.command) p.group = find_group(p.command->group);
  if (help) {
    p.action = ParsedArgs::Action::kHelp;
    return p;
  }
  if (version) {
    p.action = ParsedArgs::Action::kVersion;
    return p;
  }
  p.action = ParsedArgs::Action::kUsageError;
  if (!error.empty()) {
    p.error = error;
    return p;
  }
  if (!p.command) {
    p.error = p.group ? "missing command" : "no command given";
    return p;
  }
  const CommandSpec& c = *p.command;
  auto arg_words = words(c.args);
  if (p.args.size() < c.min_args()) {
    std::string_view missing = arg_words[p.args.size()];
    if (ends_with(missing, "...")) missing.remove_suffix(3);
    p.error = "missing " + std::string(missing);
    return p;
  }
  if (p.args.size() > c.max_args()) {
    p.error = "unexpected argument '" + p.args[c.max_args()] + "'";
    return p;
  }
  for (const auto& o : c.options) {
    if (o.required && !p.options.count(o.name)) {
      p.error = std::string(o.name) + " " + std::string(o.value) + " is required";
      return p;
    }
  }
  p.action = ParsedArgs::Action::kRun;
  return p;
}

// -------------------------------------------------------------------- help

std::string help_text(const GroupSpec* group, const CommandSpec* command) {
  std::ostringstream o;
  if (command) {
    o << "usage: " << kGlobalSynopsis << " " << command->synopsis() << "\n\n";
    o << wrap(command->details, 0);
    if (!command->options.empty()) {
      o << "\noptions:\n";
      std::vector<std::pair<std::string, std::string_view>> rows;
      for (const auto& opt : command->options)
        rows.emplace_back(opt.value.empty() ? std::string(opt.name) : std::string(opt.name) + " " + std::string(opt.value),
                          opt.help);
      o << table(rows);
    }
    o << "\noutput:\n" << wrap(command->output, 2);
    o << "\nGlobal options (--api PATH, --json) may come anywhere; see '" << kTool << " --help'.\n";
    return o.str();
  }
  if (group) {
    o << "usage: " << kGlobalSynopsis << " " << group->name << " COMMAND [ARGS...]\n\n";
    o << wrap(group->summary, 0) << "\ncommands:\n";
    std::vector<std::pair<std::string, std::string_view>> rows;
    for (const auto& c : commands())
      if (c.group == group->name) rows.emplace_back(c.synopsis(), c.summary);
    o << table(rows);
    o << "\nRun '" << kTool << " " << group->name << " COMMAND --help' for the details of one command.\n";
    return o.str();
  }
  o << "usage: " << kGlobalSynopsis << " COMMAND [ARGS...]\n"
    << "       " << kTool << " COMMAND --help\n"
    << "       " << kTool << " --version\n\n";
  o << wrap("Manages the volumes, snapshots and change tracking (CBT) of nbdsnapd through its API socket.",
            0);
  o << "\nglobal options:\n";
  o << table({
      {"--api PATH", "API socket of nbdsnapd (default: $NBDSNAP_API, else /run/nbdsnap/api.sock)"},
      {"--json", "print exactly one JSON object on stdout (errors still go to stderr)"},
      {"--help, -h", "show help; after a command, that command's help"},
      {"--version", "print the version of this client"},
  });
  o << "\ncommands:\n";
  std::vector<std::pair<std::string, std::string_view>> rows;
  for (const auto& c : commands()) rows.emplace_back(c.synopsis(), c.summary);
  o << table(rows);
  o << "\n"
    << wrap("ID is a snapshot's UUID or its name. SIZE, OFFSET and LENGTH are bytes with an optional K, M, G "
            "or T suffix (powers of 1024). Relative paths are made absolute before they are sent to the "
            "daemon.\n\n"
            "Exit status: 0 success, 1 the operation failed (the message on stderr names it and the cause), "
            "2 usage error.\n\n"
            "Run 'nbdsnap COMMAND --help' for the options and output of one command.",
            0);
  return o.str();
}

std::string usage_text(const GroupSpec* group, const CommandSpec* command) {
  std::ostringstream o;
  if (command) {
    o << "usage: " << kGlobalSynopsis << " " << command->synopsis() << "\n";
    o << "Try '" << kTool << " " << command->path() << " --help'.\n";
    return o.str();
  }
  if (group) {
    o << "usage: " << kGlobalSynopsis << " " << group->name << " COMMAND [ARGS...]\ncommands:\n";
    for (const auto& c : commands())
      if (c.group == group->name) o << "  " << c.synopsis() << "\n";
    o << "Try '" << kTool << " " << group->name << " --help'.\n";
    return o.str();
  }
  o << "usage: " << kGlobalSynopsis << " COMMAND [ARGS...]\ncommands:\n";
  for (const auto& c : commands()) o << "  " << c.synopsis() << "\n";
  o << "Try '" << kTool << " --help'.\n";
  return o.str();
}

}  // namespace nbdsnap::cli
