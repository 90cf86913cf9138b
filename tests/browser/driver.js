// Drives the system's Chromium for tests/test_browser.py, through playwright-core
// (which never downloads a browser):  node driver.js [/usr/bin/chromium]
//
// Commands arrive on stdin as JSON lines {"id": n, "cmd": ..., ...}; each is
// answered on stdout with {"id": n, "ok": true, "value": ...} or
// {"id": n, "ok": false, "error": "..."}. The first line out is
// {"ready": true, "version": "<chromium version>"} (or {"ready": false, "error": ...}).
// Every browser operation is bounded by the command's timeout (ms).
'use strict';

const readline = require('readline');
const { chromium } = require('playwright-core');

const CHROMIUM = process.argv[2] || '/usr/bin/chromium';
const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-proxy-server',  // test traffic goes straight to 127.0.0.1
];

let browser = null;
const pages = {};   // name -> {context, page, errors}

function out(message) {
  process.stdout.write(JSON.stringify(message) + '\n');
}

const commands = {
  // A fresh browser context (its own cookies) with one page at `url`.
  async open({ name, url, cookies = [], timeout = 10000 }) {
    const context = await browser.newContext({ viewport: { width: 800, height: 560 } });
    if (cookies.length) await context.addCookies(cookies.map((c) => ({ url, ...c })));
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    page.on('console', (m) => { if (m.type() === 'error') errors.push('console: ' + m.text()); });
    pages[name] = { context, page, errors };
    const response = await page.goto(url, { timeout, waitUntil: 'load' });
    return response ? response.status() : null;
  },
  // Until the JavaScript expression is truthy in the page; its value.
  async wait({ name, expression, timeout = 10000 }) {
    const handle = await pages[name].page.waitForFunction(expression, null, { timeout, polling: 50 });
    return handle.jsonValue();
  },
  async evaluate({ name, expression }) {
    return pages[name].page.evaluate(expression);
  },
  // Types a line into the chat box and presses Send.
  async say({ name, text, timeout = 10000 }) {
    const page = pages[name].page;
    await page.fill('#text', text, { timeout });
    await page.click('#send', { timeout });
    return null;
  },
  async screenshot({ name, path, timeout = 10000 }) {
    await pages[name].page.screenshot({ path, timeout });
    return path;
  },
  async errors({ name }) {
    return pages[name].errors;
  },
  async quit() {
    await browser.close();
    return null;
  },
};

async function run(line) {
  let request;
  try {
    request = JSON.parse(line);
  } catch (e) {
    out({ id: null, ok: false, error: 'not JSON: ' + line });
    return;
  }
  try {
    const command = commands[request.cmd];
    if (!command) throw new Error('unknown command ' + request.cmd);
    if (request.name !== undefined && request.cmd !== 'open' && !pages[request.name]) {
      throw new Error('no page named ' + request.name);
    }
    out({ id: request.id, ok: true, value: await command(request) });
  } catch (e) {
    out({ id: request.id, ok: false, error: String(e && e.stack || e) });
  }
  if (request.cmd === 'quit') process.exit(0);
}

async function main() {
  try {
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS, timeout: 30000 });
  } catch (e) {
    out({ ready: false, error: String(e && e.stack || e) });
    process.exit(1);
  }
  out({ ready: true, version: browser.version() });
  const input = readline.createInterface({ input: process.stdin });
  input.on('line', (line) => { run(line); });
  // The test went away: do not leave a browser behind.
  input.on('close', () => { browser.close().finally(() => process.exit(0)); });
}

main();
