// The portal's viewer page: h5web on the portal's own h5grove endpoints. The browser
// sends the session cookie with every request (same origin), and the portal checks each
// one against the signed-in user's proposals before h5grove reads anything.
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App, H5GroveProvider } from "@h5web/app";
import "@h5web/app/styles.css";

const element = document.getElementById("viewer");
// h5web builds its requests with `new URL(...)`: it needs the absolute address.
const { url, file, path } = element.dataset;
// Measured by the portal's test: from navigation start to the first plot on screen.
window.calypsoViewerStarted = performance.now();

createRoot(element).render(
  <StrictMode>
    <H5GroveProvider url={new URL(url, window.location.href).href} filepath={file}>
      <App initialPath={path || "/"} />
    </H5GroveProvider>
  </StrictMode>,
);
