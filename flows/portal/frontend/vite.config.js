// Builds the portal's HDF5 viewer (h5web) into ../static/viewer (gitignored, made by
// `make install`): one module and one stylesheet with fixed names, so the portal's
// page template names them without a manifest.
import { resolve } from "node:path";
import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

export default defineConfig({
  plugins: [react()],
  base: "/static/viewer/",
  build: {
    outDir: resolve(__dirname, "../static/viewer"),
    emptyOutDir: true,
    sourcemap: false,
    chunkSizeWarningLimit: 4000, // h5web and three.js are one bundle, loaded once
    rollupOptions: {
      input: resolve(__dirname, "src/main.jsx"),
      output: {
        entryFileNames: "viewer.js",
        chunkFileNames: "[name].js",
        assetFileNames: "viewer[extname]",
      },
    },
  },
});
