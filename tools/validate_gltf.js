#!/usr/bin/env node
// Validate glTF / GLB files with the Khronos glTF validator (npm package `gltf-validator`).
//
//   node tools/validate_gltf.js FILE.glb [FILE2.gltf ...]
//
// Prints one JSON line per file: {"file", "errors", "warnings", "infos", "hints", "messages": [...errors first]}
// and exits 0 when no file has errors, 1 when one has, 2 when the validator is not installed or a file cannot be
// read. The package is looked up in $GLTF_VALIDATOR_MODULES, then in <repo>/.gl/node_modules (where `make setup`
// installs it: npm install --prefix .gl gltf-validator@2.0.0-dev.3.10), then on node's normal search path.
'use strict';
const fs = require('fs');
const path = require('path');

function loadValidator() {
  const dirs = [process.env.GLTF_VALIDATOR_MODULES, path.join(__dirname, '..', '.gl', 'node_modules')].filter(Boolean);
  for (const dir of dirs) {
    const candidate = path.join(dir, 'gltf-validator');
    if (fs.existsSync(candidate)) return require(candidate);
  }
  try {
    return require('gltf-validator');
  } catch (err) {
    process.stderr.write(
      'gltf-validator is not installed: run `make setup` or ' +
      '`npm install --prefix .gl gltf-validator@2.0.0-dev.3.10` in the repository root\n');
    process.exit(2);
  }
}

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    process.stderr.write('usage: node tools/validate_gltf.js FILE.glb [...]\n');
    process.exit(2);
  }
  const validator = loadValidator();
  let failed = false;
  for (const file of files) {
    let data;
    try {
      data = new Uint8Array(fs.readFileSync(file));
    } catch (err) {
      process.stderr.write(`cannot read ${file}: ${err.message}\n`);
      process.exit(2);
    }
    const report = await validator.validateBytes(data, {
      uri: path.basename(file),
      maxIssues: 0,
      writeTimestamp: false,
      externalResourceFunction: (uri) => new Promise((resolve, reject) => {
        fs.readFile(path.resolve(path.dirname(file), decodeURIComponent(uri)), (err, buf) => {
          if (err) reject(err.toString()); else resolve(new Uint8Array(buf));
        });
      }),
    });
    const issues = report.issues;
    const messages = issues.messages
      .slice()
      .sort((a, b) => a.severity - b.severity)
      .map((m) => ({ code: m.code, severity: m.severity, message: m.message, pointer: m.pointer }));
    process.stdout.write(JSON.stringify({
      file,
      errors: issues.numErrors,
      warnings: issues.numWarnings,
      infos: issues.numInfos,
      hints: issues.numHints,
      messages,
    }) + '\n');
    if (issues.numErrors > 0) failed = true;
  }
  process.exit(failed ? 1 : 0);
}

main().catch((err) => {
  process.stderr.write(`validation failed: ${err}\n`);
  process.exit(2);
});
