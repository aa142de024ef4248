/**
 * Tests of deploy/prometheus/: the scrape config targets the unit's
 * `--metrics` address, and Prometheus's own `promtool` accepts the config
 * and rules and fires the alerts on the series they are meant for.
 */

import assert from "node:assert/strict";
import { fileURLToPath as fromFileUrl } from "node:url";
import { parseFlags } from "../options.ts";
import { findExecutable, runCommand, withTempDir } from "../test_util.ts";

const here = (path: string) => fromFileUrl(new URL(path, import.meta.url));
const CONFIG_PATH = here("prometheus/prometheus.yml");
const RULES_PATH = here("prometheus/echo-server.rules.yml");
const UNIT_PATH = here("echo-server.service");
const README_PATH = here("README.md");

const promtool = findExecutable("promtool");
const needsPromtool = promtool === undefined
  ? " (ignored: promtool not installed; apt-get install prometheus)"
  : "";

Deno.test("deploy/prometheus/prometheus.yml scrapes the address the unit passes to --metrics", async () => {
  const unit = await Deno.readTextFile(UNIT_PATH);
  const execStart = /^ExecStart=(.+)$/m.exec(unit)![1].split(/\s+/);
  const config = parseFlags(execStart.slice(1));
  assert.ok(typeof config === "object");
  assert.deepEqual(config.metrics, { hostname: "127.0.0.1", port: 9400 });
  const scrape = await Deno.readTextFile(CONFIG_PATH);
  assert.match(scrape, /targets: \["127\.0\.0\.1:9400"\]/);
});

Deno.test("deploy/README.md shows the scrape config and the rules as they are", async () => {
  const readme = await Deno.readTextFile(README_PATH);
  for (const path of [CONFIG_PATH, RULES_PATH]) {
    const text = await Deno.readTextFile(path);
    assert.ok(readme.includes("```yaml\n" + text + "```"), `${path} differs`);
  }
});

Deno.test({
  name:
    `deploy/prometheus/prometheus.yml and its rules pass promtool check config${needsPromtool}`,
  ignore: promtool === undefined,
  async fn() {
    const result = await runCommand(promtool!, [
      "check",
      "config",
      CONFIG_PATH,
    ]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
    assert.match(result.stdout, /SUCCESS: 1 rule files found/);
  },
});

/** A series of `values` (promtool's notation) for instance "a". */
function series(name: string, labels: string, values: string) {
  return {
    series: `${name}{job="echo-server",instance="a"${labels}}`,
    values,
  };
}

Deno.test({
  name:
    `deploy/prometheus/echo-server.rules.yml alerts on cut-offs, exhaustion and the access log (backlog, drops, reopen), not on shutdown${needsPromtool}`,
  ignore: promtool === undefined,
  fn: withTempDir(async (dir) => {
    const firing = (
      alertname: string,
      labels: Record<string, string>,
      annotations: Record<string, string>,
    ) => ({
      alertname,
      exp_alerts: [{
        exp_labels: { job: "echo-server", instance: "a", ...labels },
        exp_annotations: annotations,
      }],
    });
    const tests = {
      rule_files: [RULES_PATH],
      evaluation_interval: "1m",
      tests: [{
        // 100 clients a minute, 10 cut off idle, 50 cut off at shutdown
        // (ignored), and from minute 20 accept runs out of descriptors.
        interval: "1m",
        input_series: [
          series("echo_connections_accepted_total", "", "0+100x40"),
          series("echo_cutoffs_total", ',reason="idle"', "0+10x40"),
          series("echo_cutoffs_total", ',reason="shutdown"', "0+50x40"),
          series(
            "echo_accept_errors_total",
            ',kind="exhaustion"',
            "0x20 1+1x20",
          ),
          series("up", "", "1x40"),
        ],
        alert_rule_test: [
          // Pending until it has held for 10 minutes.
          { eval_time: "8m", alertname: "EchoServerCuttingOffClients" },
          {
            eval_time: "16m",
            ...firing("EchoServerCuttingOffClients", { severity: "warning" }, {
              summary: "echo-server a cuts off 10% of its clients",
              description:
                "See echo_cutoffs_total by reason, and the server's stderr (journalctl -u echo-server) for each cut-off.",
            }),
          },
          { eval_time: "16m", alertname: "EchoServerOutOfFileDescriptors" },
          {
            eval_time: "25m",
            ...firing(
              "EchoServerOutOfFileDescriptors",
              { severity: "warning", kind: "exhaustion" },
              {
                summary:
                  "echo-server a ran out of file descriptors or memory while accepting",
              },
            ),
          },
          { eval_time: "25m", alertname: "EchoServerDown" },
        ],
      }, {
        // A full disk from minute 5 to 15: the backlog grows, and from
        // minute 7 to 10 lines drop; a backlog for one 30 s scrape at 25.5
        // is no alert; a reopen fails from minute 20 to 28.
        interval: "30s",
        input_series: [
          series(
            "echo_log_backlog_lines",
            "",
            "0x9 100+100x19 0x20 50 0x19",
          ),
          series("echo_log_dropped_lines_total", "", "0x13 0+40x6 280x50"),
          series("echo_log_reopen_pending", "", "0x39 1x16 0x15"),
          series("up", "", "1x70"),
        ],
        alert_rule_test: [
          { eval_time: "6m", alertname: "EchoServerLogBacklogNotDraining" },
          {
            eval_time: "8m",
            ...firing(
              "EchoServerLogBacklogNotDraining",
              { severity: "warning" },
              {
                summary:
                  "echo-server a has 700 access log lines waiting for the disk",
                description:
                  "Free space on the log's file system (or raise its quota or file-size limit); see the server's stderr for the write error.",
              },
            ),
          },
          { eval_time: "26m", alertname: "EchoServerLogBacklogNotDraining" },
          { eval_time: "6m", alertname: "EchoServerLogLinesDropped" },
          {
            eval_time: "9m",
            ...firing("EchoServerLogLinesDropped", { severity: "critical" }, {
              summary: "echo-server a dropped access log lines (backlog full)",
            }),
          },
          { eval_time: "30m", alertname: "EchoServerLogLinesDropped" },
          { eval_time: "24m", alertname: "EchoServerLogReopenFailing" },
          {
            eval_time: "26m",
            ...firing("EchoServerLogReopenFailing", { severity: "warning" }, {
              summary:
                "echo-server a cannot reopen its access log after rotation",
            }),
          },
          { eval_time: "30m", alertname: "EchoServerLogReopenFailing" },
        ],
      }, {
        // 2% cut off, and a shutdown cutting off everyone: no alert.
        interval: "1m",
        input_series: [
          series("echo_connections_accepted_total", "", "0+100x40"),
          series("echo_cutoffs_total", ',reason="reset"', "0+2x40"),
          series("echo_cutoffs_total", ',reason="shutdown"', "0x30 100x10"),
          series("up", "", "1x30 0x10"),
        ],
        alert_rule_test: [
          { eval_time: "38m", alertname: "EchoServerCuttingOffClients" },
          {
            eval_time: "38m",
            ...firing("EchoServerDown", { severity: "critical" }, {
              summary: "echo-server a does not answer /metrics",
            }),
          },
        ],
      }],
    };
    // JSON is YAML.
    await Deno.writeTextFile(`${dir}/tests.yml`, JSON.stringify(tests));
    const result = await runCommand(promtool!, [
      "test",
      "rules",
      `${dir}/tests.yml`,
    ]);
    assert.equal(result.code, 0, result.stdout + result.stderr);
  }),
});
